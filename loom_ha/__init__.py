"""loom-ha: high-availability messaging for Loom agents and any CloudEvents app."""
