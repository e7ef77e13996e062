"""The one attention entry point of the language model.

``attention(q, k, v, prefix_len=..., segment_ids=..., impl=...)`` computes prefix-LM attention
(see ``videolm/model/masks.py`` for the mask) with one of several implementations that must agree:

* ``'xla'``: ``jax.nn.dot_product_attention`` with a boolean mask built from the compact metadata;
* ``'reference'``: dense einsum softmax in f32 at highest precision (the ground truth in tests);
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (GPU only);
* ``'pallas'``: the flash-attention kernel of ``videolm.kernels.attention`` (imported when used),
  run inside ``jax.shard_map`` over batch and heads when a mesh is set;
* ``'auto'``: ``'pallas'`` on TPU/GPU, ``'xla'`` on CPU.

Shapes: q [B, S, H, D]; k, v [B, S, KVH, D] with H a multiple of KVH (grouped KV heads);
prefix_len int [B] or None (plain causal); segment_ids int [B, S] or None.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd

from videolm.model import masks

IMPLEMENTATIONS = ("xla", "reference", "cudnn", "pallas", "auto")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"
    return impl


def _check_shapes(q, k, v, prefix_len, segment_ids):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention: q must be [B,S,H,D] and k, v [B,S,KVH,D]; got {q.shape}, {k.shape}, {v.shape}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"attention: k/v {k.shape} do not fit q {q.shape} (heads must be a multiple of kv heads)")
    if prefix_len is not None and jnp.shape(prefix_len) != (b,):
        raise ValueError(f"attention: prefix_len must have shape [{b}], got {jnp.shape(prefix_len)}")
    if segment_ids is not None and jnp.shape(segment_ids) != (b, s):
        raise ValueError(f"attention: segment_ids must have shape [{b}, {s}], got {jnp.shape(segment_ids)}")


def reference_attention(q, k, v, *, prefix_len=None, segment_ids=None):
    """Dense softmax attention in f32 (highest precision), output in q.dtype."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    mask = masks.prefix_lm_mask(s, prefix_len, segment_ids, batch_size=b)  # [B, 1, S, S]
    qg = q.astype(jnp.float32).reshape(b, s, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32), precision="highest") * d ** -0.5
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, s, h, d).astype(q.dtype)


def _dot_product_attention(q, k, v, prefix_len, segment_ids, implementation):
    mask = masks.prefix_lm_mask(q.shape[1], prefix_len, segment_ids, batch_size=q.shape[0])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _pallas_attention(q, k, v, prefix_len, segment_ids):
    try:
        from videolm.kernels.attention import flash_attention, sharded_flash_attention
    except ImportError as e:
        raise NotImplementedError(
            "attention_impl 'pallas' needs videolm.kernels.attention.flash_attention, which cannot be "
            f"imported ({e}); use attention_impl='xla'") from e
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh.empty or not rules or mesh.size == 1:
        return flash_attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids, causal=True)
    # Under a mesh each device runs the kernel on its own batch rows and heads.
    return sharded_flash_attention(q, k, v, mesh=mesh, rules=rules, prefix_len=prefix_len,
                                   segment_ids=segment_ids, causal=True)


def attention(q, k, v, *, prefix_len=None, segment_ids=None, impl: str = "xla"):
    """Prefix-LM attention [B, S, H, D] with the implementation named by ``impl``."""
    _check_shapes(q, k, v, prefix_len, segment_ids)
    impl = resolve_impl(impl)
    if prefix_len is not None:
        prefix_len = jnp.asarray(prefix_len, jnp.int32)
    if impl == "reference":
        return reference_attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids)
    if impl in ("xla", "cudnn"):
        return _dot_product_attention(q, k, v, prefix_len, segment_ids, impl)
    return _pallas_attention(q, k, v, prefix_len, segment_ids)
