"""What the coordinator runs: the ServerApp, its round loop and the run directory."""
