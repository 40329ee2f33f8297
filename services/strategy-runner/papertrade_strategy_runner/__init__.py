"""papertrade strategy-runner: Runs user strategies against the stack; deploy, stop, start and inspect them over REST."""
