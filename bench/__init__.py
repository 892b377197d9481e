"""Benchmarks of gemini-scale (``python bench/bench.py``); a package so uvicorn can import
``bench.bench`` factories when it serves the apps under test."""
