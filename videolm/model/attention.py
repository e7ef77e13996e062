"""The one attention entry point of the language model.

``attention(q, k, v, prefix_len=..., segment_ids=..., impl=...)`` computes prefix-LM attention
(see ``videolm/model/masks.py`` for the mask) with one of several implementations that must agree:

* ``'xla'``: ``jax.nn.dot_product_attention`` with a boolean mask built from the compact metadata;
* ``'chunked'``: the same per block of ``CHUNK`` queries, each over only the keys it can see
  (the causal extent, or all keys when a row's prefix reaches past it): skips the masked upper
  triangle, about 40% of the work at VideoPoet's shapes; the fastest on CPU;
* ``'reference'``: dense einsum softmax in f32 at highest precision (the ground truth in tests);
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (GPU only);
* ``'pallas'``: the flash-attention kernel of ``videolm.kernels.attention`` (imported when used),
  run inside ``jax.shard_map`` over batch and heads when a mesh is set;
* ``'auto'``: ``'pallas'`` on TPU/GPU, ``'xla'`` on CPU.

Shapes: q [B, S, H, D]; k, v [B, S, KVH, D] with H a multiple of KVH (grouped KV heads);
prefix_len int [B] or None (plain causal); segment_ids int [B, S] or None.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd

from videolm.model import masks

IMPLEMENTATIONS = ("xla", "chunked", "reference", "cudnn", "pallas", "auto")
CHUNK = 128  # query block of the 'chunked' implementation


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


def _chunked_attention(q, k, v, prefix_len, segment_ids, chunk: int = CHUNK):
    """Query blocks [start, stop) of ``chunk`` rows attend keys [0, stop): all they can see unless
    a prefix reaches past the block, in which case (decided at run time by ``lax.cond``) the block
    attends every key. Exact for any prefix lengths and segment ids."""
    b, s = q.shape[:2]
    if s <= chunk:
        return _dot_product_attention(q, k, v, prefix_len, segment_ids, "xla")
    longest_prefix = jnp.zeros((), jnp.int32) if prefix_len is None else jnp.max(prefix_len)
    outputs = []
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)

        def block(num_keys, start=start, stop=stop):
            i = jnp.arange(start, stop)[:, None]
            j = jnp.arange(num_keys)[None, :]
            mask = (j <= i)[None]
            if prefix_len is not None:
                mask = mask | (j[None] < prefix_len[:, None, None])
            if segment_ids is not None:
                mask = mask & (segment_ids[:, start:stop, None] == segment_ids[:, None, :num_keys])
            mask = jnp.broadcast_to(mask, (b, stop - start, num_keys))[:, None]
            return jax.nn.dot_product_attention(q[:, start:stop], k[:, :num_keys], v[:, :num_keys],
                                                mask=mask, implementation="xla")

        if stop == s:
            outputs.append(block(s))
        else:
            outputs.append(jax.lax.cond(longest_prefix > stop, functools.partial(block, s),
                                        functools.partial(block, stop)))
    return jnp.concatenate(outputs, axis=1)


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
    if impl == "chunked":
        return _chunked_attention(q, k, v, prefix_len, segment_ids)
    if impl in ("xla", "cudnn"):
        return _dot_product_attention(q, k, v, prefix_len, segment_ids, impl)
    return _pallas_attention(q, k, v, prefix_len, segment_ids)

