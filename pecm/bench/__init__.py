"""Benchmarking of the PECM ops (see pecm.bench.runner)."""
