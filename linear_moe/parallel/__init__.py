"""Parallelism the mixers add to megatron-core's: context parallelism (context_parallel.py)."""
