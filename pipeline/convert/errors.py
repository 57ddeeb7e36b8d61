"""The converters' one error type (no paddle)."""


class ConversionError(Exception):
    """The checkpoint or runtime directory cannot be converted; the message explains what differs."""
