"""Test support shipped with loom-ha: real-server launchers, pytest fixtures, conformance suite."""
