"""papertrade orderbook: The simulated exchange: price-time-priority limit order books with synthetic liquidity."""
