"""Serving: one base model, many prefixes, behind one OpenAI-compatible API.

Only api.py (the FastAPI app and the error table) and protocol.py (request bodies) know the web. The
engine side: engine.Engine composes scheduler (queue, admission), registry (which adapters exist and which are
resident), sampler and output (tokens -> events); torch_engine and llamacpp_engine implement the model side;
backends builds one by name; offline wraps any engine for Python callers.
"""
