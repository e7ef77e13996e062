"""Counting the FLOPs of convolutions and matrix products in a traced function.

The count walks the jaxpr (into jit, scan, cond, custom-vjp and remat sub-jaxprs) and adds
2 * multiply-adds of every ``conv_general_dilated`` and ``dot_general``; elementwise work, norms
and reductions are not counted, the convention of the PyTorch peer's FlopCounterMode. A ``cond``
counts its most expensive branch. The count of a causal 3D convolution is the same for every
``conv_impl`` (the time taps are the same multiply-adds in another layout).
"""
from __future__ import annotations

import math

import jax
from jax.extend import core


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out_feature, in_feature, spatial...)
    kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * kernel_spatial * in_per_group


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * contract


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        if isinstance(value, core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, core.ClosedJaxpr):
                    yield v.jaxpr
                elif isinstance(v, core.Jaxpr):
                    yield v


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
            if name == "scan":
                inner *= eqn.params["length"]
            total += inner
    return total


def count_flops(fn, *args, **kwargs) -> int:
    """Conv + matmul FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
