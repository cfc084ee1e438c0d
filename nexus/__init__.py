"""Nexus: turn a rack of mixed GPU machines into one compute cluster."""

__version__ = "0.1.0"
