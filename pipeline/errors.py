"""Errors every layer may raise about what the user asked for (no paddle)."""


class ConfigError(Exception):
    """An impossible or inconsistent setting; the message says which flag to change."""
