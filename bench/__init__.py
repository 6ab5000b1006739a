"""Benchmarks for CAT Relay; `python -m bench.delivery` measures delivery latency (see bench/RESULTS.md)."""
