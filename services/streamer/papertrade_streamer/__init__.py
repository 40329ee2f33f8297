"""papertrade streamer: Market data: synthetic, replayed and Polygon bars on NATS; history over REST."""
