"""Backends that reach inference over HTTP: OpenAI-compatible servers, Ollama, TEI."""
