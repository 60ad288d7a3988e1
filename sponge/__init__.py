"""Sponge: inference serving for requests that each carry their own latency objective."""

__version__ = "0.1.0"
