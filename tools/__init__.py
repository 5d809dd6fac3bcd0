"""Processes around the relay: the local launcher and the embedded Redis server."""
