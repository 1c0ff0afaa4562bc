"""mailroom: self-hosted email for a handful of accounts on a home server."""

__version__ = "0.1.0"
