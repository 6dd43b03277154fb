"""Local HTTP + WebSocket API over the Runtime."""
