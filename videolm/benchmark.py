"""Benchmark helpers: same-run matmul peak, robust timing, FLOP counting, one JSON line of results.

Speed on a shared machine is noisy, so every benchmark reports its throughput next to the f32
matmul peak measured in the same process (at the start and again at the end) and quotes ratios.

FLOPs (``count_flops``) are counted from the traced jaxpr, the convention of the PyTorch peers'
FlopCounterMode: 2 x multiply-adds of every ``conv_general_dilated`` and ``dot_general``, walking
into jit, custom-vjp/jvp, remat, scan (times its length), while (its body once) and cond (its
costliest branch). A transposed (input-dilated) convolution, which is also how the gradient of a
strided convolution is computed, is counted without the inserted zeros. Elementwise work, norms,
reductions, FFTs and the optimiser are not counted.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core


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


# ------------------------------------------------------------------------------- FLOP counting


def _conv_flops(eqn) -> float:
    rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out_feature, in_feature, spatial...)
    kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    inserted_zeros = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out.shape) * kernel_spatial * in_per_group / inserted_zeros


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(eqn):
    """The jaxprs nested in an equation's parameters (jit, custom_vjp/jvp, remat, while, ...)."""
    for value in eqn.params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr) -> float:
    """Convolution and matmul FLOPs of a jaxpr or closed jaxpr (see the module docstring)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
            total += inner * eqn.params["length"] if name == "scan" else inner
    return total


def count_flops(fn: Callable, *args, **kwargs) -> float:
    """Conv + matmul FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
