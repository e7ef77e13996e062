"""Residual vector quantisation with EMA codebooks, k-means initialisation and dead-code restarts.

Level ``l`` quantises the residual ``r_l = z - sum_{j<l} q_j`` to its nearest code (squared L2),
so each level refines what the previous ones left. Codebooks are not gradient-trained: they live
in ``RVQState`` variables (apart from the ``nnx.Param`` tree) and a training step updates them
functionally:

* ``initialize`` (first step only): k-means (k-means++ seeding) on the first batch, level by level;
* ``update``: EMA of per-code counts and sums (decay 0.99), codebook = sum / Laplace-smoothed
  count, then every code whose EMA count fell below ``dead_code_threshold`` is re-seeded with a
  random residual from the batch.

Under ``jax.jit`` with a data-parallel mesh the counts and sums are reductions over the global
batch, so every device applies the same update (the statistics are synchronised by the sum).

Tokens for the language model: ``flatten_codes`` lays a ``[levels, frames]`` grid out level by
level (all level-0 frames, then level 1, ...) and offsets level ``l`` by ``l * codebook_size`` so
the levels occupy disjoint id ranges; ``unflatten_codes`` inverts it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RVQState(nnx.Variable):
    """Quantiser state updated by k-means / EMA / restarts inside the step, never by gradients."""


class QuantizerOutput(NamedTuple):
    quantized: jax.Array         # [B, T, D] straight-through sum of the active levels' codes
    codes: jax.Array             # [B, T, L] int32
    commitment_loss: jax.Array   # scalar: sum over active levels of mean ||r_l - sg(q_l)||^2
    residuals: jax.Array         # [L, B, T, D] the (stop-gradient) input of each level


def nearest_code(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared L2) for each vector: [N, D], [K, D] -> [N]."""
    distances = (jnp.sum(vectors * vectors, -1, keepdims=True) - 2.0 * vectors @ codebook.T
                 + jnp.sum(codebook * codebook, -1)[None, :])
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def kmeans_plus_plus(vectors: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn with probability proportional to its squared
    distance from the centres so far (uniformly once every vector is a centre)."""
    n = vectors.shape[0]
    keys = jax.random.split(key, num_clusters)
    first = vectors[jax.random.randint(keys[0], (), 0, n)]
    centres = jnp.zeros((num_clusters, vectors.shape[1]), vectors.dtype).at[0].set(first)
    dist = jnp.sum(jnp.square(vectors - first), -1)

    def draw(i, carry):
        centres, dist = carry
        logits = jnp.where(jnp.max(dist) > 0, jnp.log(jnp.maximum(dist, 0.0)), 0.0)
        centre = vectors[jax.random.categorical(keys[i], logits)]
        return centres.at[i].set(centre), jnp.minimum(dist, jnp.sum(jnp.square(vectors - centre), -1))

    return jax.lax.fori_loop(1, num_clusters, draw, (centres, dist))[0]


def kmeans(vectors: jax.Array, num_clusters: int, key: jax.Array, iterations: int):
    """k-means (k-means++ seeding, then Lloyd): ``[N, D] -> (centroids [K, D], counts [K])``.

    An empty cluster keeps its centroid; ``counts`` are the sizes of the final assignment.
    """
    n = vectors.shape[0]
    centroids = kmeans_plus_plus(vectors, num_clusters, key)

    def assign(centroids):
        codes = nearest_code(vectors, centroids)
        sums = jax.ops.segment_sum(vectors, codes, num_segments=num_clusters)
        counts = jax.ops.segment_sum(jnp.ones((n,), vectors.dtype), codes, num_segments=num_clusters)
        return sums, counts

    def lloyd(_, centroids):
        sums, counts = assign(centroids)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

    centroids = jax.lax.fori_loop(0, iterations, lloyd, centroids)
    return centroids, assign(centroids)[1]


class ResidualVQ(nnx.Module):
    """``num_levels`` codebooks of ``codebook_size`` codes of dimension ``dim``."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int, *, decay: float = 0.99,
                 dead_code_threshold: float = 2.0, kmeans_iterations: int = 10, epsilon: float = 1e-5,
                 rngs: nnx.Rngs):
        if num_levels < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"ResidualVQ: need num_levels >= 1, codebook_size >= 2, dim >= 1; got "
                             f"{num_levels}, {codebook_size}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ResidualVQ: decay must be in [0, 1), got {decay}")
        self.num_levels, self.codebook_size, self.dim = num_levels, codebook_size, dim
        self.decay, self.dead_code_threshold = decay, dead_code_threshold
        self.kmeans_iterations, self.epsilon = kmeans_iterations, epsilon
        init = jax.random.normal(rngs.params(), (num_levels, codebook_size, dim), jnp.float32)
        axes = ("rvq_level", "codebook", "codebook_dim")
        self.codebooks = RVQState(init, out_sharding=axes)
        self.ema_sum = RVQState(init, out_sharding=axes)
        self.ema_count = RVQState(jnp.ones((num_levels, codebook_size), jnp.float32),
                                  out_sharding=axes[:2])
        self.initialized = RVQState(jnp.zeros((), jnp.int32))

    # ------------------------------------------------------------------ inference

    def encode(self, latents: jax.Array, num_levels: int | None = None) -> jax.Array:
        """Latents ``[B, T, D]`` -> codes ``[B, T, num_levels]`` (greedy residual quantisation)."""
        num_levels = self._check_levels(num_levels)
        codebooks = self.codebooks[...]
        residual = latents.reshape(-1, self.dim)
        codes = []
        for level in range(num_levels):
            idx = nearest_code(residual, codebooks[level])
            residual = residual - codebooks[level][idx]
            codes.append(idx)
        return jnp.stack(codes, -1).reshape(latents.shape[:-1] + (num_levels,))

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[..., n]`` of the first ``n`` levels -> summed code vectors ``[..., D]``."""
        n = codes.shape[-1]
        self._check_levels(n)
        codebooks = self.codebooks[...]
        return sum(codebooks[level][codes[..., level]] for level in range(n))

    def _check_levels(self, n):
        n = self.num_levels if n is None else int(n)
        if not 1 <= n <= self.num_levels:
            raise ValueError(f"ResidualVQ: number of levels must be in [1, {self.num_levels}], got {n}")
        return n

    # ------------------------------------------------------------------ training

    def __call__(self, latents: jax.Array, active_levels: jax.Array | None = None) -> QuantizerOutput:
        """Quantises ``[B, T, D]`` with all levels; ``active_levels`` [B] (quantizer dropout)
        keeps only the first ``active_levels[b]`` levels of example ``b`` in ``quantized``."""
        batch, frames, dim = latents.shape
        if dim != self.dim:
            raise ValueError(f"ResidualVQ: latents have dim {dim}, codebooks have {self.dim}")
        codebooks = jax.lax.stop_gradient(self.codebooks[...])
        levels = jnp.arange(self.num_levels)
        if active_levels is None:
            mask = jnp.ones((batch, self.num_levels), latents.dtype)
        else:
            mask = (levels[None, :] < active_levels[:, None]).astype(latents.dtype)
        residual = latents
        total = jnp.zeros_like(latents)
        commitment = jnp.float32(0.0)
        codes, residuals = [], []
        for level in range(self.num_levels):
            idx = nearest_code(jax.lax.stop_gradient(residual).reshape(-1, dim), codebooks[level])
            q = codebooks[level][idx].reshape(batch, frames, dim)
            m = mask[:, level][:, None, None]
            per_example = jnp.mean(jnp.square(residual - q), axis=(1, 2))
            commitment = commitment + jnp.mean(mask[:, level] * per_example)
            residuals.append(jax.lax.stop_gradient(residual))
            codes.append(idx.reshape(batch, frames))
            total = total + m * q
            residual = residual - q
        quantized = latents + jax.lax.stop_gradient(total - latents)   # straight-through estimator
        return QuantizerOutput(quantized, jnp.stack(codes, -1), commitment, jnp.stack(residuals))

    def initialize(self, latents: jax.Array, key: jax.Array) -> None:
        """K-means initialisation from ``latents`` [B, T, D], once: a no-op after the first call."""
        vectors = jax.lax.stop_gradient(latents).reshape(-1, self.dim)

        def run_kmeans(_):
            residual = vectors
            books, counts = [], []
            for level in range(self.num_levels):
                book, count = kmeans(residual, self.codebook_size, jax.random.fold_in(key, level),
                                     self.kmeans_iterations)
                residual = residual - book[nearest_code(residual, book)]
                books.append(book)
                counts.append(count)
            books, counts = jnp.stack(books), jnp.stack(counts)
            return books, counts, books * counts[..., None]

        current = (self.codebooks[...], self.ema_count[...], self.ema_sum[...])
        books, counts, sums = jax.lax.cond(self.initialized[...] > 0, lambda _: current, run_kmeans,
                                           None)
        self.codebooks[...] = books
        self.ema_count[...] = counts
        self.ema_sum[...] = sums
        self.initialized[...] = jnp.ones((), jnp.int32)

    def update(self, residuals: jax.Array, codes: jax.Array, key: jax.Array) -> dict:
        """EMA codebook update and dead-code restart from one step's ``residuals`` [L, B, T, D]
        and ``codes`` [B, T, L]. Returns per-level statistics (restarted codes, batch usage)."""
        num_levels, k = self.num_levels, self.codebook_size
        vectors = jax.lax.stop_gradient(residuals).reshape(num_levels, -1, self.dim)
        codes = jnp.moveaxis(codes, -1, 0).reshape(num_levels, -1)
        n = vectors.shape[1]
        counts = jax.vmap(lambda c: jnp.bincount(c, length=k))(codes).astype(jnp.float32)
        sums = jax.vmap(lambda v, c: jax.ops.segment_sum(v, c, num_segments=k))(vectors, codes)
        ema_count = self.decay * self.ema_count[...] + (1.0 - self.decay) * counts
        ema_sum = self.decay * self.ema_sum[...] + (1.0 - self.decay) * sums
        total = jnp.sum(ema_count, -1, keepdims=True)
        smoothed = (ema_count + self.epsilon) / (total + k * self.epsilon) * total
        codebooks = ema_sum / smoothed[..., None]

        dead = ema_count < self.dead_code_threshold                            # [L, K]
        pick = jax.random.randint(key, (num_levels, k), 0, n)
        fresh = jnp.take_along_axis(vectors, pick[..., None], axis=1)          # [L, K, D]
        self.codebooks[...] = jnp.where(dead[..., None], fresh, codebooks)
        self.ema_sum[...] = jnp.where(dead[..., None], fresh * self.dead_code_threshold, ema_sum)
        self.ema_count[...] = jnp.where(dead, jnp.float32(self.dead_code_threshold), ema_count)
        return {"restarted": jnp.sum(dead, -1), "batch_usage": jnp.mean(counts > 0, -1)}


# ---------------------------------------------------------------------- token layout for the LM

def flatten_codes(codes, codebook_size: int):
    """``[..., levels, frames]`` codes -> ``[..., levels * frames]`` ids, level by level, with level
    ``l`` offset by ``l * codebook_size`` (disjoint ranges). Works on numpy and jax arrays."""
    xp = jnp if isinstance(codes, jax.Array) else np
    codes = xp.asarray(codes)
    if codes.ndim < 2:
        raise ValueError(f"flatten_codes: expected [..., levels, frames], got shape {codes.shape}")
    levels = codes.shape[-2]
    offsets = (xp.arange(levels) * codebook_size)[:, None]
    return (codes + offsets).reshape(codes.shape[:-2] + (-1,))


def unflatten_codes(ids, num_levels: int, codebook_size: int):
    """Inverse of ``flatten_codes``: ``[..., num_levels * frames]`` -> ``[..., num_levels, frames]``.

    Raises ValueError when the length is not a multiple of ``num_levels`` or an id lies outside
    its level's range (checked for concrete arrays)."""
    xp = jnp if isinstance(ids, jax.Array) else np
    ids = xp.asarray(ids)
    if ids.shape[-1] % num_levels:
        raise ValueError(f"unflatten_codes: {ids.shape[-1]} ids is not a multiple of {num_levels} levels")
    grid = ids.reshape(ids.shape[:-1] + (num_levels, ids.shape[-1] // num_levels))
    offsets = (xp.arange(num_levels) * codebook_size)[:, None]
    codes = grid - offsets
    if not isinstance(codes, jax.core.Tracer):
        bad = (np.asarray(codes) < 0) | (np.asarray(codes) >= codebook_size)
        if bad.any():
            raise ValueError(f"unflatten_codes: {int(bad.sum())} ids fall outside their level's range "
                             f"[l * {codebook_size}, (l + 1) * {codebook_size})")
    return codes
