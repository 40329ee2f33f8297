"""papertrade broker: The Alpaca-compatible trading API and the ledger of orders, fills, positions and cash."""
