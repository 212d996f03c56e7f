"""Experiments built on the library: scripts that turn names into objects and compare runs (not the API)."""
