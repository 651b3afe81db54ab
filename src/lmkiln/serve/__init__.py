"""Serving: an OpenAI-compatible HTTP API (FastAPI + uvicorn; `pip install lmkiln[serve]`)."""
