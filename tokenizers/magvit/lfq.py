"""Lookup-free quantization (LFQ): every latent channel is one bit.

A latent vector z in R^K is quantized to q = sign(z) in {-1, +1}^K; the token index is
``sum_i 2^i * 1{z_i > 0}``, so the implicit codebook has 2^K entries and no embedding table.
The gradient passes straight through the sign (``z + stop_gradient(q - z)``).

Training adds two terms:

* commitment ``mean((z - stop_gradient(q))^2)`` (weight 0.25 in MAGVIT-v2);
* the entropy loss ``E[H(p(c|z))] - gamma * H(E[p(c|z)])`` with the soft assignment
  ``p(c|z) = softmax_c(-||z - c||^2 / temperature)``. The first term makes each assignment
  confident, the second spreads the batch over the codebook (against collapse). With 2^18 codes the
  full distribution does not fit in memory, so the bits are split into sub-groups of at most
  ``bits_per_group`` bits and the entropies are summed over groups (exact for the per-sample
  term, which factorises over bits; an upper bound of the codebook term that is tight when the
  groups are independent). Memory per position is ``num_groups * 2^bits_per_group``.

Everything here runs in f32 whatever the model's compute dtype: the logits are scaled by
``1 / temperature`` (100 by default) and would overflow or lose all precision in half precision.
Batch statistics are means over every position of the global batch; under ``jax.jit`` with a
sharded batch XLA averages across devices, so the loss is the same on 1 or N devices.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def quantize(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sign quantization with a straight-through gradient.

    Args:
      z: [..., K] latents (any float dtype; computed in f32).
    Returns:
      (zq, indices): zq f32 [..., K] in {-1, +1} (gradient of identity w.r.t. z), indices int32 [...].
    """
    z = z.astype(jnp.float32)
    q = jnp.where(z > 0, 1.0, -1.0).astype(jnp.float32)
    zq = z + jax.lax.stop_gradient(q - z)
    return zq, codes_to_indices(q)


def _check_bits(num_bits: int) -> None:
    if not 1 <= num_bits <= 30:
        raise ValueError(f"LFQ supports 1 to 30 bits (int32 token indices), got {num_bits}")


def codes_to_indices(codes: jax.Array) -> jax.Array:
    """{-1, +1} (or any sign) codes [..., K] -> int32 indices sum_i 2^i * 1{code_i > 0}."""
    num_bits = codes.shape[-1]
    _check_bits(num_bits)
    weights = jnp.asarray(1 << np.arange(num_bits), jnp.int32)
    return jnp.sum(jnp.where(codes > 0, weights, 0), axis=-1).astype(jnp.int32)


def indices_to_codes(indices: jax.Array, num_bits: int) -> jax.Array:
    """int indices [...] -> f32 codes [..., num_bits] in {-1, +1} (inverse of codes_to_indices)."""
    _check_bits(num_bits)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"token indices must be integers, got dtype {indices.dtype}")
    bits = (indices[..., None].astype(jnp.int32) >> jnp.arange(num_bits, dtype=jnp.int32)) & 1
    return jnp.where(bits > 0, 1.0, -1.0).astype(jnp.float32)


def commitment_loss(z: jax.Array) -> jax.Array:
    """mean((z - stop_gradient(sign(z)))^2) in f32."""
    z = z.astype(jnp.float32)
    q = jax.lax.stop_gradient(jnp.where(z > 0, 1.0, -1.0))
    return jnp.mean(jnp.square(z - q))


def bit_groups(num_bits: int, bits_per_group: int) -> list[int]:
    """Sizes of the sub-groups the entropy is computed over (as equal as possible, each <= max)."""
    if bits_per_group < 1:
        raise ValueError(f"entropy bits_per_group must be >= 1, got {bits_per_group}")
    num_groups = math.ceil(num_bits / bits_per_group)
    base, extra = divmod(num_bits, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def _entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy in nats; 0 * log 0 = 0 (no NaN for one-hot distributions)."""
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0), axis=axis)


def group_entropies(z: jax.Array, *, temperature: float, bits_per_group: int
                    ) -> tuple[jax.Array, jax.Array]:
    """(mean per-sample entropy, codebook entropy of the mean distribution), summed over groups.

    Args:
      z: [..., K] latents; every leading position is one sample of the batch statistics.
      temperature: softmax temperature of the soft assignment p(c|z) ∝ exp(-||z-c||^2 / temperature).
      bits_per_group: the largest sub-group; memory per position is 2^bits_per_group per group.
    Returns:
      two f32 scalars in nats.
    """
    if not temperature > 0:
        raise ValueError(f"entropy temperature must be > 0, got {temperature}")
    z = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    per_sample, codebook = jnp.float32(0.0), jnp.float32(0.0)
    start = 0
    for size in bit_groups(z.shape[-1], bits_per_group):
        zg = z[:, start:start + size]
        start += size
        codes = indices_to_codes(jnp.arange(2 ** size), size)                  # [2^g, g]
        # -||z - c||^2 = 2 z.c - ||z||^2 - g; the terms without c cancel in the softmax.
        logits = (2.0 / temperature) * (zg @ codes.T)                          # [N, 2^g]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        probs = jnp.exp(log_probs)
        per_sample = per_sample + jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
        codebook = codebook + _entropy(jnp.mean(probs, axis=0))
    return per_sample, codebook


def entropy_loss(z: jax.Array, *, temperature: float = 0.01, bits_per_group: int = 9,
                 diversity_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """E[H(p(c|z))] - diversity_weight * H(E[p(c|z)]) in f32, and its two parts for logging."""
    per_sample, codebook = group_entropies(z, temperature=temperature, bits_per_group=bits_per_group)
    loss = per_sample - diversity_weight * codebook
    return loss, {"per_sample_entropy": per_sample, "codebook_entropy": codebook}


def entropy_weight_at(step, *, base_weight: float, start_multiplier: float, anneal_steps: int):
    """The entropy-loss weight: ``start_multiplier * base`` at step 0, linearly down to ``base`` at
    ``anneal_steps`` and constant after (MAGVIT-v2: 3x -> 1x over the first 2k steps)."""
    if anneal_steps <= 0:
        return jnp.float32(base_weight)
    frac = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
    return jnp.float32(base_weight) * (1.0 + (start_multiplier - 1.0) * frac)


def codebook_usage(counts: np.ndarray) -> dict:
    """Usage statistics of a histogram of token counts over a whole evaluation set.

    Returns the fraction of codes used at least once, the perplexity exp(H) of the empirical
    distribution, and its entropy in bits per token.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("codebook_usage: the histogram is empty")
    probs = counts / total
    nz = probs[probs > 0]
    entropy_nats = float(-(nz * np.log(nz)).sum())
    return {"codebook_usage": float((counts > 0).mean()),
            "perplexity": float(math.exp(entropy_nats)),
            "token_entropy_bits": entropy_nats / math.log(2)}
