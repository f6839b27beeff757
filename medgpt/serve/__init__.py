"""Serving: the OpenAI-compatible API, the web UI, the vLLM launcher (layer: serve; imports rag, infer and
lower)."""
