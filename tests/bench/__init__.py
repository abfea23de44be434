"""Benchmarks for realtime-service (not collected by pytest; run ``python -m tests.bench.run``)."""
