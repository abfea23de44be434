"""Realtime diagnosis updates over WebSockets, beside the main API (contract: PROTOCOL.md)."""

__version__ = "1.0.0"
