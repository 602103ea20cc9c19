"""pytest plugin (entry point `pytest11`): real-server fixtures for loom-ha and its users."""
