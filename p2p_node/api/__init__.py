"""HTTP API: OpenAI-compatible inference, rerank, status and admin routes."""
