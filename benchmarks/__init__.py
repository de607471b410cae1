"""Benchmarks of tlsearch: `python -m benchmarks.bench` (CPU) and `python -m benchmarks.gpu`."""
