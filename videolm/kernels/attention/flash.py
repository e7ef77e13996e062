"""The public flash-attention entry point: validation, backend choice, padding, custom VJP.

Backends: ``"tpu"`` (Pallas Mosaic, ``tpu.py``) and ``"gpu"`` (Pallas Triton, ``gpu.py``).
``backend=None`` picks the one of the default device. On CPU it picks ``"gpu"``: that
kernel loops over tiles inside one program, which Pallas's generic interpreter runs
several times faster than the Mosaic interpreter runs the TPU kernel's grid; pass
``backend="tpu"`` to run the TPU kernel under ``pltpu.InterpretParams``, the mode that
also catches TPU-only mistakes such as out-of-bounds block reads (the tests run both).
``interpret=None`` means "interpret iff the default device is a CPU"; ``interpret=True``
picks the backend's interpreter.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from videolm.kernels.attention import block_sizes as bs
from videolm.kernels.attention import gpu, tpu
from videolm.kernels.attention.reference import check_inputs, visibility_limits

BACKENDS = ("tpu", "gpu")


def default_backend() -> str:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _interpret_arg(interpret, backend):
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True:
        return pltpu.InterpretParams() if backend == "tpu" else True
    return interpret


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_attention(q, k, v, *, prefix_len=None, segment_ids=None, causal=True, sm_scale=None,
                    block_sizes=None, interpret=None, backend=None):
    """Flash attention with prefix-LM, causal and segment masks (see ``reference.py``).

    q: [B, S, H, D]; k, v: [B, S, KVH, D], H % KVH == 0; prefix_len: int [B] or None;
    segment_ids: int [B, S] or None. Returns [B, S, H, D] in q.dtype (f32 accumulation).
    Differentiable in q, k, v through dedicated backward kernels.
    """
    b, s, h, kvh, d = check_inputs(q, k, v, prefix_len, segment_ids)
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    if block_sizes is None:
        block_sizes = bs.get_block_sizes(backend, s, d, q.dtype)
    bs.validate(block_sizes, backend)
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    interpret = _interpret_arg(interpret, backend)

    # Pad the sequence to a multiple of every block. Padded keys lie beyond every query's
    # visibility limit (q_lim <= s - 1) so they are masked for free; padded queries are
    # sliced away and receive zero cotangents.
    multiple = math.lcm(*block_sizes.all())
    s_pad = -(-s // multiple) * multiple
    q_lim = visibility_limits(b, s, prefix_len, causal=causal)
    pad_seq = [(0, 0), (0, s_pad - s)]
    q_lim = jnp.pad(q_lim, pad_seq, constant_values=s - 1)
    if segment_ids is not None:
        segment_ids = jnp.pad(jnp.asarray(segment_ids, jnp.int32), pad_seq, mode="edge")
    d_pad = d
    if backend == "gpu":
        d_pad = max(16, _next_power_of_two(d))  # Triton tiles are powers of two
    pad = [(0, 0), (0, s_pad - s), (0, 0), (0, d_pad - d)]
    q, k, v = (jnp.pad(x, pad) if pad != [(0, 0)] * 4 else x for x in (q, k, v))
    if backend == "tpu":  # heads-major tiles
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = _flash(q, k, v, q_lim, segment_ids, scale, block_sizes, backend, interpret)
    if backend == "tpu":
        out = out.transpose(0, 2, 1, 3)
    return out[:, :s, :, :d]


def _backend_module(backend):
    return tpu if backend == "tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_lim, segment_ids, sm_scale, block_sizes, backend, interpret):
    return _flash_fwd(q, k, v, q_lim, segment_ids, sm_scale, block_sizes, backend,
                      interpret)[0]


def _flash_fwd(q, k, v, q_lim, segment_ids, sm_scale, block_sizes, backend, interpret):
    out, lse = _backend_module(backend).forward(
        q, k, v, q_lim, segment_ids, sm_scale=sm_scale, block_q=block_sizes.block_q,
        block_k=block_sizes.block_k, interpret=interpret)
    return out, (q, k, v, q_lim, segment_ids, out, lse)


def _flash_bwd(sm_scale, block_sizes, backend, interpret, residuals, do):
    q, k, v, q_lim, segment_ids, out, lse = residuals
    dq, dk, dv = _backend_module(backend).backward(
        q, k, v, q_lim, segment_ids, out, lse, do, sm_scale=sm_scale,
        block_q_dq=block_sizes.block_q_dq, block_k_dq=block_sizes.block_k_dq,
        block_q_dkv=block_sizes.block_q_dkv, block_k_dkv=block_sizes.block_k_dkv,
        interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
