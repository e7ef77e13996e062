"""Benchmark helpers: same-run matmul peak, robust timing, one JSON line of results.

Speed on a shared machine is noisy, so every benchmark reports its throughput next to the f32
matmul peak measured in the same process (at the start and again at the end) and quotes ratios.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _block(x):
    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, steps: int = 5, warmup: int = 2) -> dict:
    """Median and min seconds of ``fn()`` (results blocked on) after ``warmup`` calls."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """f32 matmul throughput of this process's default device (median of ``repeats``)."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    timing = time_fn(lambda: matmul(a, b), steps=repeats, warmup=2)
    return 2.0 * size ** 3 / timing["median_s"] / 1e9


def environment() -> dict:
    return {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def emit(result: dict) -> str:
    """The JSON line a benchmark prints last; numpy scalars become plain numbers."""
    def plain(x):
        if isinstance(x, (np.floating, np.integer)):
            return x.item()
        if isinstance(x, float):
            return round(x, 6)
        return x
    line = json.dumps({k: plain(v) for k, v in result.items()}, sort_keys=False, default=str)
    print(line, flush=True)
    return line


class PeakBracket:
    """Measures the matmul peak before and after a benchmark body: ``with PeakBracket() as peak:``."""

    def __enter__(self):
        self.start = matmul_peak_gflops()
        return self

    def __exit__(self, *exc):
        self.end = matmul_peak_gflops()

    @property
    def gflops(self) -> float:
        """The peak quoted against: the larger of the two readings (conservative ratio)."""
        return max(self.start, getattr(self, "end", 0.0))
