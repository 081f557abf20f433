"""Helpers for multi-process CPU tests and benchmarks (gloo)."""

from cp_infer.testing.multiprocess import (
    DistributedError,
    DistributedPool,
    free_port,
)

__all__ = ["DistributedError", "DistributedPool", "free_port"]
