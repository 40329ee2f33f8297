"""NATS: subject names, JetStream stream definitions and the connection helper."""
