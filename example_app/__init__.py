"""The example gemini-scale gateway: a FastAPI app built only from the public API."""
