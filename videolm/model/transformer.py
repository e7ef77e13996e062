"""The prefix-LM transformer: one decoder-only stack over the unified token space.

Pre-norm blocks (RMSNorm), rotary positions (rotate-half, on the full head dim), optional
QK-norm, grouped KV heads, SwiGLU MLP, untied output projection, no biases. Layers are stacked
on a leading ``layers`` axis and run with ``jax.lax.scan`` (or unrolled) under a remat policy
named in the config. Every parameter carries logical axis names (``out_sharding`` metadata) and
the main activations are constrained by logical names; ``videolm.parallel`` maps both to the mesh.

Logical names used:
  parameters: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers, text_embed
  activations: batch, length, act_embed, act_heads, act_kv_heads, act_mlp
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from videolm.model.attention import attention, resolve_impl
from videolm.parallel import constrain
from videolm.text import TextEmbeddingProjection
from videolm.vocab import VocabLayout

# Which activations a scanned layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,                                                    # keep everything, no recompute
    "full": jax.checkpoint_policies.nothing_saveable,                # keep only layer inputs
    "dots": jax.checkpoint_policies.dots_saveable,                   # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not attention
    "proj": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}


def _param(rngs, init, shape, names, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _rms(x, eps):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype, name: str = "norm"):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(name,), eager_sharding=False)
        self.eps = eps

    def __call__(self, x):
        return (_rms(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, base: float):
    """cos, sin [B or 1, S, head_dim/2] (f32) for integer positions [B or 1, S]."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half rotary embedding of x [B, S, H, D]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Block(nnx.Module):
    """x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(.))."""

    def __init__(self, *, width, num_heads, num_kv_heads, head_dim, mlp_dim, depth, qk_norm, norm_eps,
                 dtype, param_dtype, attention_impl, rngs: nnx.Rngs):
        fan_in = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        out_scale = 1.0 / (2 * depth)  # residual branches scaled so the stack starts near identity
        self.attn_norm = RMSNorm(width, eps=norm_eps, param_dtype=param_dtype)
        self.wq = _param(rngs, fan_in, (width, num_heads, head_dim), ("embed", "q_heads", "head_dim"), param_dtype)
        self.wk = _param(rngs, fan_in, (width, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = _param(rngs, fan_in, (width, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        attn_out = jax.nn.initializers.variance_scaling(out_scale, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        self.wo = _param(rngs, attn_out, (num_heads, head_dim, width), ("q_heads", "head_dim", "embed"), param_dtype)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype, name="head_dim")
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype, name="head_dim")
        else:
            self.q_norm = self.k_norm = None
        self.mlp_norm = RMSNorm(width, eps=norm_eps, param_dtype=param_dtype)
        # Gate and up projections side by side: one matmul [D] -> [2, F].
        self.wi = _param(rngs, fan_in, (width, 2, mlp_dim), ("embed", None, "mlp"), param_dtype)
        mlp_out = jax.nn.initializers.variance_scaling(out_scale, "fan_in", "normal", in_axis=0, out_axis=1)
        self.wo_mlp = _param(rngs, mlp_out, (mlp_dim, width), ("mlp", "embed"), param_dtype)
        self.dtype = dtype
        self.attention_impl = attention_impl

    def _cast(self, param):
        return param[...].astype(self.dtype)

    def qkv(self, x, rope):
        """q [B, T, H, Dh], k, v [B, T, KVH, Dh] of the normed input, rotated to their positions.

        ``qkv`` and ``residual`` are the block's two halves around attention, so that a cached
        decoder can run the same math with its own attention."""
        h = self.attn_norm(x)
        q = jnp.einsum("bsd,dhk->bshk", h, self._cast(self.wq))
        k = jnp.einsum("bsd,dhk->bshk", h, self._cast(self.wk))
        v = jnp.einsum("bsd,dhk->bshk", h, self._cast(self.wv))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(checkpoint_name(q, "qkv"), ("batch", "length", "act_heads", None))
        k = constrain(checkpoint_name(k, "qkv"), ("batch", "length", "act_kv_heads", None))
        v = constrain(checkpoint_name(v, "qkv"), ("batch", "length", "act_kv_heads", None))
        return q, k, v

    def residual(self, x, o):
        """x + Wo(o) for the attention output o [B, T, H, Dh], then + the SwiGLU MLP branch."""
        o = checkpoint_name(o, "attn_out")
        x = x + constrain(jnp.einsum("bshk,hkd->bsd", o, self._cast(self.wo)), ("batch", "length", "act_embed"))
        h = self.mlp_norm(x)
        gate_up = constrain(jnp.einsum("bsd,dcf->bscf", h, self._cast(self.wi)), ("batch", "length", None, "act_mlp"))
        hidden = checkpoint_name(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], "mlp_hidden")
        return x + constrain(jnp.einsum("bsf,fd->bsd", hidden, self._cast(self.wo_mlp)), ("batch", "length", "act_embed"))

    def __call__(self, x, rope, prefix_len, segment_ids):
        q, k, v = self.qkv(x, rope)
        o = attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids, impl=self.attention_impl)
        return self.residual(x, o)


class PrefixLM(nnx.Module):
    """Decoder-only prefix LM. ``hidden`` gives final normed states; ``__call__`` gives logits."""

    def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp_dim: int | None = None, qk_norm: bool = False,
                 rope_base: float = 10000.0, norm_eps: float = 1e-6, dtype: str = "float32",
                 param_dtype: str = "float32", remat_policy: str = "none", scan_layers: bool = True,
                 attention_impl: str = "xla", text_embed_dim: int = 0, rngs: nnx.Rngs):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or width // num_heads
        mlp_dim = mlp_dim or 4 * width
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary positions")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}")
        resolve_impl(attention_impl)  # validates the name
        dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.embedding = _param(rngs, jax.nn.initializers.normal(1.0), (vocab_size, width), ("vocab", "embed"),
                                param_dtype)

        block_args = dict(width=width, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          mlp_dim=mlp_dim, depth=depth, qk_norm=qk_norm, norm_eps=norm_eps, dtype=dtype,
                          param_dtype=param_dtype, attention_impl=attention_impl)

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}, graph=True)
        def make_blocks(rngs):
            return Block(**block_args, rngs=rngs)

        self.blocks = make_blocks(rngs.split(depth))
        self.final_norm = RMSNorm(width, eps=norm_eps, param_dtype=param_dtype)
        self.head = _param(rngs, jax.nn.initializers.normal(width ** -0.5), (width, vocab_size), ("embed", "vocab"),
                           param_dtype)
        self.text_projection = (TextEmbeddingProjection(text_embed_dim, width, param_dtype=param_dtype, rngs=rngs)
                                if text_embed_dim else None)
        self.vocab_size, self.width, self.depth, self.head_dim = vocab_size, width, depth, head_dim
        self.rope_base, self.dtype = rope_base, dtype
        self.remat_policy, self.scan_layers = remat_policy, scan_layers

    def embed(self, tokens, text_embeddings=None):
        # Gather whole rows: the table's embed axis is all-gathered (FSDP) before the lookup.
        table = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        x = jnp.take(table, tokens, axis=0)
        if text_embeddings is not None:
            if self.text_projection is None:
                raise ValueError("text_embeddings given but the model has no text projection (text_embed_dim=0)")
            x = self.text_projection(x, tokens, text_embeddings, VocabLayout.special("<text_emb>"))
        return constrain(x, ("batch", "length", "act_embed"))

    def hidden(self, tokens, *, prefix_len=None, segment_ids=None, positions=None, text_embeddings=None):
        """Final normed hidden states [B, S, width] for tokens int [B, S]."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [batch, seq], got shape {tokens.shape}")
        x = self.embed(tokens, text_embeddings)
        if positions is None:
            positions = jnp.arange(tokens.shape[1])[None]
        rope = rope_tables(positions, self.head_dim, self.rope_base)

        def layer(x, block):
            return block(x, rope, prefix_len, segment_ids), None

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            x, _ = jax.lax.scan(layer, x, self.blocks)
        else:
            for i in range(self.depth):
                x, _ = layer(x, jax.tree.map(lambda p: p[i], self.blocks))
        return self.final_norm(x)

    def logits(self, hidden):
        return jnp.einsum("bsd,dv->bsv", hidden, self.head[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, **kwargs):
        return self.logits(self.hidden(tokens, **kwargs))


def count_params(state) -> dict:
    """Total parameters and the non-embedding count (everything but the input embedding table)."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    total = sum(int(x.size) for _, x in leaves)
    embedding = sum(int(x.size) for path, x in leaves if "embedding" in jax.tree_util.keystr(path))
    return {"params": total, "params_nonembedding": total - embedding}
