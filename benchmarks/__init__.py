"""Benchmarks of issue 4: launch latency, hub load, concurrency and memory (``python -m benchmarks``)."""
