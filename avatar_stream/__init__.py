"""avatar-stream: a real-time talking-head avatar server."""

__version__ = "0.1.0"
