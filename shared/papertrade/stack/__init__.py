"""The local stack: embedded infrastructure, service processes and the `make up` runner."""
