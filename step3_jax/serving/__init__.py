"""Serving: the client side that measures an OpenAI-compatible server (``step3-jax loadtest``)."""
