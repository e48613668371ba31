"""Serving: the OpenAI-compatible HTTP API (api) in front of the batching engine (engine)."""
