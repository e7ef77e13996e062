"""Dense attention with VideoPoet's masks: the reference every kernel is tested against.

Mask semantics (shared by every implementation in this folder). For batch row b, query i
and key j, with ``P = prefix_len[b]``:

  * causal=True:  j is visible from i iff ``j <= i or j < P`` (the prefix attends both
    ways, the outputs causally), and i, j are in the same segment;
  * causal=False: j is visible from i iff i and j are in the same segment.

``j <= i or j < P`` is ``j <= max(i, P - 1)``: every mask here is "keys up to a per-query
limit, within the query's segment". :func:`visibility_limits` computes that limit, the
compact metadata the kernels consume instead of an S x S mask. The limit never decreases
along the sequence, which is what makes whole blocks of the mask easy to classify.

A query with no visible key (only possible with segment ids) gets a zero output and zero
gradients, never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(q, k, v, prefix_len=None, segment_ids=None):
    """Validates shapes; returns (batch, seq_len, num_heads, num_kv_heads, head_dim)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got q{q.shape} k{k.shape} v{v.shape}")
    b, s, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(
            f"k and v must be [batch={b}, seq={s}, kv_heads, head_dim={d}] like q{q.shape}; "
            f"got k{k.shape} v{v.shape}")
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={kvh} (GQA/MQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if prefix_len is not None and jnp.shape(prefix_len) != (b,):
        raise ValueError(f"prefix_len must be int [batch={b}]; got shape {jnp.shape(prefix_len)}")
    if segment_ids is not None and jnp.shape(segment_ids) != (b, s):
        raise ValueError(
            f"segment_ids must be int [batch={b}, seq={s}]; got shape {jnp.shape(segment_ids)}")
    return b, s, h, kvh, d


def visibility_limits(batch: int, seq_len: int, prefix_len=None, *, causal: bool = True):
    """Per-query last visible key position, int32 [batch, seq_len].

    causal: ``max(i, prefix_len - 1)`` clipped to the sequence; not causal: ``seq_len - 1``.
    """
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    if not causal:
        return jnp.full((batch, seq_len), seq_len - 1, jnp.int32)
    if prefix_len is None:
        return jnp.broadcast_to(pos, (batch, seq_len))
    prefix = jnp.asarray(prefix_len, jnp.int32).reshape(batch, 1)
    return jnp.minimum(jnp.maximum(pos, prefix - 1), seq_len - 1)


def dense_mask(q_lim, segment_ids=None):
    """Boolean [batch, 1, seq, seq] mask (True = visible) from the per-query limits."""
    s = q_lim.shape[1]
    mask = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= q_lim[:, :, None]
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask[:, None]


def reference_attention(q, k, v, *, prefix_len=None, segment_ids=None, causal=True,
                        sm_scale=None):
    """Dense softmax attention in f32; returns [B, S, H, D] in q.dtype.

    q: [B, S, H, D]; k, v: [B, S, KVH, D] with H % KVH == 0. See the module docstring
    for the mask.
    """
    b, s, h, kvh, d = check_inputs(q, k, v, prefix_len, segment_ids)
    scale = d ** -0.5 if sm_scale is None else sm_scale
    mask = dense_mask(visibility_limits(b, s, prefix_len, causal=causal), segment_ids)
    qf = q.astype(jnp.float32).reshape(b, s, kvh, h // kvh, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qf, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = mask[:, :, None]  # [B, 1, 1, S, S]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, s, h, d).astype(q.dtype)


def xla_attention(q, k, v, *, prefix_len=None, segment_ids=None, causal=True, sm_scale=None,
                  implementation=None):
    """``jax.nn.dot_product_attention`` (implementation None/'xla'/'cudnn') with our mask.

    The mask is materialised as a boolean [B, 1, S, S] array: fine for a reference and a
    fallback, which is what this is. A fully masked query row is zeroed explicitly.
    """
    b, s, _, _, _ = check_inputs(q, k, v, prefix_len, segment_ids)
    q_lim = visibility_limits(b, s, prefix_len, causal=causal)
    mask = dense_mask(q_lim, segment_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale,
                                       implementation=implementation)
    if segment_ids is not None:
        any_visible = jnp.any(mask[:, 0], axis=-1)  # [B, S]
        out = jnp.where(any_visible[:, :, None, None], out, jnp.zeros_like(out))
    return out
