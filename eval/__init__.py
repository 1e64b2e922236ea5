"""Benchmark harness for hf_prefix_cache: data, models and measurements."""
