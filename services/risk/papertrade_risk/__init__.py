"""papertrade risk: Pre-trade risk checks: approve, clip or reject every order; kill switch."""
