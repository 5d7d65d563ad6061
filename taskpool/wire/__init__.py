"""The wire formats, one module a channel."""

class ProtocolError(ValueError):
    """A message that does not decode: wrong version, unknown type, wrong length."""
