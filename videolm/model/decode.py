"""Cache-aware forward of ``PrefixLM``: a bidirectional prefill and a one-token step.

Autoregressive sampling runs the prefix once and then one token per step, reading the keys and
values of every earlier position from a fixed-size cache instead of recomputing them. The math is
that of ``Block.__call__`` / ``PrefixLM.hidden`` with the same parameters (``wq``, ``wk``, ``wv``,
``wo``, ``wi``, ``wo_mlp``, the norms, ``q_norm``/``k_norm`` when present), the stacked layers run
with ``jax.lax.scan`` or unrolled over per-layer arrays (``KVCache``).

Rows of a batch are **left-padded** to a common prefix length ``P``: row b's prompt occupies slots
``[pad_len[b], P)``, so every row's next token goes to the same slot ``P + n`` and one
``dynamic_update_slice`` writes the whole batch. Row b's token in slot s has rotary position
``s - pad_len[b]`` (the position it has in the unpadded sequence), and padding slots are never
attended by a real position. The cached logits therefore equal the full forward's logits of each
row alone, position by position (up to float rounding).

Shapes:
  cache.k, cache.v  [layers, B * kv_heads, max_len, head_dim] (the compute dtype), or one
                    [B * kv_heads, max_len, head_dim] per layer (see ``KVCache``)
  tokens            int [B, P] (prefill), int [B] (step)
  pad_len           int [B]: padding slots at the start of each row
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from videolm.model.attention import attention
from videolm.model.transformer import PrefixLM, apply_rope, rope_tables
from videolm.parallel import constrain


class KVCache(NamedTuple):
    """Keys and values of every layer at every slot written so far.

    Rows are (batch, kv head) pairs, ``row = b * kv_heads + head``, so that each head's keys are
    one contiguous [max_len, head_dim] matrix that the attention matmuls read in place. Either
    stacked, ``k``/``v`` [layers, B * kv_heads, max_len, head_dim] (the layers run in a
    ``lax.scan``), or one [B * kv_heads, max_len, head_dim] array per layer in a tuple (the layers
    run unrolled over ``unstack_layers(model)``: on CPU every per-layer slice of a stacked array
    that feeds a matmul is a copy, which would double the memory traffic of each step).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]  # a layer's [B * KVH, M, D] either way

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def init_cache(model: PrefixLM, batch_size: int, max_len: int, *, per_layer: bool = False) -> KVCache:
    """An all-zero cache for ``batch_size`` rows of up to ``max_len`` slots."""
    depth, _, kv_heads, head_dim = model.blocks.wk[...].shape
    rows = batch_size * kv_heads
    if per_layer:
        zeros = tuple(jnp.zeros((rows, max_len, head_dim), model.dtype) for _ in range(depth))
    else:
        zeros = jnp.zeros((depth, rows, max_len, head_dim), model.dtype)
    return KVCache(k=zeros, v=zeros)


def unstack_layers(model: PrefixLM) -> list:
    """The stacked ``model.blocks`` as one ``Block`` per layer (separate arrays, sliced once)."""
    return [jax.tree.map(lambda p: p[i], model.blocks) for i in range(model.depth)]


def default_layer_loop() -> str:
    """``'unrolled'`` on CPU (no per-step weight copies), ``'scan'`` on accelerators."""
    return "unrolled" if jax.default_backend() == "cpu" else "scan"


def _cast(block, name):
    return getattr(block, name)[...].astype(block.dtype)


def _qkv(block, x, rope):
    """Pre-norm, q/k/v projections, QK-norm and rotary positions, as in ``Block.__call__``."""
    h = block.attn_norm(x)
    q = jnp.einsum("bsd,dhk->bshk", h, _cast(block, "wq"))
    k = jnp.einsum("bsd,dhk->bshk", h, _cast(block, "wk"))
    v = jnp.einsum("bsd,dhk->bshk", h, _cast(block, "wv"))
    if block.q_norm is not None:
        q, k = block.q_norm(q), block.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    return q, k, v


def _finish(block, x, o):
    """Attention output projection, residual, then the SwiGLU MLP, as in ``Block.__call__``."""
    x = x + constrain(jnp.einsum("bshk,hkd->bsd", o, _cast(block, "wo")), ("batch", "length", "act_embed"))
    h = block.mlp_norm(x)
    gate_up = constrain(jnp.einsum("bsd,dcf->bscf", h, _cast(block, "wi")), ("batch", "length", None, "act_mlp"))
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return x + constrain(jnp.einsum("bsf,fd->bsd", hidden, _cast(block, "wo_mlp")), ("batch", "length", "act_embed"))


def _cache_rows(x, dtype):
    """[B, S, KVH, D] -> [B * KVH, S, D], the cache layout."""
    b, s, kvh, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * kvh, s, d).astype(dtype)


def _check_batch(model: PrefixLM, cache: KVCache, tokens, pad_len):
    kv_heads = model.blocks.wk[...].shape[2]
    if cache.rows != tokens.shape[0] * kv_heads or jnp.shape(pad_len) != (tokens.shape[0],):
        raise ValueError(f"decode: tokens {tokens.shape}, pad_len {jnp.shape(pad_len)} and a cache of "
                         f"{cache.rows} rows (batch x {kv_heads} kv heads) disagree")


def prefill(model: PrefixLM, tokens, pad_len, cache: KVCache, *, text_embeddings=None):
    """Runs the left-padded prefix bidirectionally and writes its keys/values to slots [0, P).

    Returns (logits f32 [B, vocab] at the last prefix slot, i.e. the distribution of the first
    target token; the updated cache).
    """
    if tokens.ndim != 2:
        raise ValueError(f"prefill: tokens must be int [batch, prefix], got shape {tokens.shape}")
    _check_batch(model, cache, tokens, pad_len)
    b, p = tokens.shape
    if p > cache.max_len:
        raise ValueError(f"prefill: prefix of {p} slots does not fit the cache of {cache.max_len}")
    slots = jnp.arange(p)[None]
    pad_len = jnp.asarray(pad_len, jnp.int32)[:, None]
    positions = jnp.maximum(slots - pad_len, 0)
    # Padding is segment 0 and the prompt segment 1: a real position never attends padding; the
    # whole prefix is bidirectional (prefix_len = P).
    segment_ids = (slots >= pad_len).astype(jnp.int32)
    prefix_len = jnp.full((b,), p, jnp.int32)
    rope = rope_tables(positions, model.head_dim, model.rope_base)
    x = model.embed(tokens, text_embeddings)
    dtype = model.dtype

    def layer(x, block):
        q, k, v = _qkv(block, x, rope)
        o = attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids, impl=block.attention_impl)
        return _finish(block, x, o), (_cache_rows(k, dtype), _cache_rows(v, dtype))

    if model.scan_layers:
        x, (k, v) = jax.lax.scan(layer, x, model.blocks)  # k, v [layers, B * KVH, P, D]
        ks, vs = list(k), list(v)
    else:
        ks, vs = [], []
        for block in unstack_layers(model):
            x, (k, v) = layer(x, block)
            ks.append(k)
            vs.append(v)
    if cache.per_layer:
        write = lambda c, new: jax.lax.dynamic_update_slice(c, new, (0, 0, 0))  # noqa: E731
        cache = KVCache(k=tuple(map(write, cache.k, ks)), v=tuple(map(write, cache.v, vs)))
    else:
        origin = (0, 0, 0, 0)
        cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, jnp.stack(ks), origin),
                        v=jax.lax.dynamic_update_slice(cache.v, jnp.stack(vs), origin))
    logits = model.logits(model.final_norm(x[:, -1:]))[:, 0]
    return logits, cache


def _cached_attention(q, k_cache, v_cache, key_valid, k_new=None, v_new=None):
    """One query per row over the cached keys where ``key_valid`` (plus ``k_new`` when given).

    q [B, 1, H, D]; k_cache, v_cache [B * KVH, M, D]; key_valid [B, M]; k_new, v_new [B * KVH, 1, D]:
    the query's own key and value when they are not in the cache yet (then the cache is only read
    here and written once per step, after every layer).
    """
    b, _, h, d = q.shape
    rows, m, _ = k_cache.shape
    qg = q.reshape(rows, h * b // rows, d)  # [B * KVH, G, D]: a kv head's group of query heads
    valid = jnp.repeat(key_valid, rows // b, axis=0)[:, None, :]  # [B * KVH, 1, M]
    scale = d ** -0.5
    f32 = jnp.float32
    scores = jnp.einsum("rgd,rmd->rgm", qg, k_cache, preferred_element_type=f32) * scale
    scores = jnp.where(valid, scores, -jnp.inf)
    if k_new is not None:
        own = jnp.einsum("rgd,rsd->rgs", qg, k_new, preferred_element_type=f32) * scale
        scores = jnp.concatenate([scores, own], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("rgm,rmd->rgd", probs[..., :m].astype(v_cache.dtype), v_cache, preferred_element_type=f32)
    if v_new is not None:
        out = out + probs[..., m:] * v_new.astype(f32)
    return out.reshape(b, 1, h, d).astype(q.dtype)


def step(model: PrefixLM, token, slot, pad_len, cache: KVCache, layers=None):
    """Feeds one token per row at ``slot`` (same for every row) and returns the next logits.

    token int [B]; slot int scalar (>= the prefix length P; every slot below it is filled);
    pad_len int [B]. A stacked cache scans ``model.blocks``; a per-layer cache needs ``layers``
    (``unstack_layers(model)``, computed once outside the decoding loop). Returns (logits f32
    [B, vocab] for the token after ``token``, the cache with slot ``slot`` written).
    """
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise ValueError(f"step: token must be int [batch], got shape {token.shape}")
    _check_batch(model, cache, token, pad_len)
    if cache.per_layer != (layers is not None):
        raise ValueError("step: a per-layer cache goes with layers=unstack_layers(model), a stacked one without")
    pad_len = jnp.asarray(pad_len, jnp.int32)
    slot = jnp.asarray(slot, jnp.int32)
    positions = (slot - pad_len)[:, None]
    rope = rope_tables(positions, model.head_dim, model.rope_base)
    key_slots = jnp.arange(cache.max_len)[None]
    before = (key_slots >= pad_len[:, None]) & (key_slots < slot)  # [B, M] earlier real slots
    x = model.embed(token[:, None])
    dtype = model.dtype
    zero = jnp.zeros((), jnp.int32)

    if layers is None:
        # Scanned layers read their cache slice as it was and score the new key apart; the new
        # keys/values of all layers are written in one update after the scan.
        def layer(x, inputs):
            block, k_cache, v_cache = inputs
            q, k, v = _qkv(block, x, rope)
            k, v = _cache_rows(k, dtype), _cache_rows(v, dtype)
            o = _cached_attention(q, k_cache, v_cache, before, k, v)
            return _finish(block, x, o), (k, v)

        x, (k, v) = jax.lax.scan(layer, x, (model.blocks, cache.k, cache.v))
        start = (zero, zero, slot, zero)
        cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, k, start),
                        v=jax.lax.dynamic_update_slice(cache.v, v, start))
    else:
        # Unrolled layers write first and then read the updated buffer, so each update is in place.
        upto = before | (key_slots == slot)
        ks, vs = [], []
        for block, k_cache, v_cache in zip(layers, cache.k, cache.v):
            q, k, v = _qkv(block, x, rope)
            k_cache = jax.lax.dynamic_update_slice(k_cache, _cache_rows(k, dtype), (zero, slot, zero))
            v_cache = jax.lax.dynamic_update_slice(v_cache, _cache_rows(v, dtype), (zero, slot, zero))
            x = _finish(block, x, _cached_attention(q, k_cache, v_cache, upto))
            ks.append(k_cache)
            vs.append(v_cache)
        cache = KVCache(k=tuple(ks), v=tuple(vs))
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, cache


def teacher_forced_logits(model: PrefixLM, tokens, pad_len, prefix_slots: int, *, layer_loop: str = "scan"):
    """Logits of every target position through prefill + one ``step`` per token (a lax.scan).

    tokens int [B, S] left-padded (prefix in slots [pad_len, prefix_slots), targets after).
    ``layer_loop``: ``'scan'`` (stacked cache) or ``'unrolled'`` (per-layer cache and layers).
    Returns f32 [B, S - prefix_slots, vocab]: entry n predicts ``tokens[:, prefix_slots + n]``,
    the same quantity as ``model(tokens)[:, prefix_slots - 1 + n]`` of each unpadded row.
    """
    b, s = tokens.shape
    layers = unstack_layers(model) if layer_loop == "unrolled" else None
    cache = init_cache(model, b, s, per_layer=layers is not None)
    first, cache = prefill(model, tokens[:, :prefix_slots], pad_len, cache)

    def body(cache, n):
        slot = prefix_slots + n
        logits, cache = step(model, tokens[:, slot], slot, pad_len, cache, layers)
        return cache, logits

    _, rest = jax.lax.scan(body, cache, jnp.arange(s - prefix_slots - 1))
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
