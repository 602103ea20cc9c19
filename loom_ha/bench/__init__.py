"""Benchmarks: loom-ha beside the raw clients, measured in the same run."""
