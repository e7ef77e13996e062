"""Adversarial-training pieces shared by the video and audio tokenizers.

All losses take discriminator logits (any shape; averaged) and return f32 scalars.

* non-saturating GAN (MAGVIT-v2): ``ns_d_loss`` / ``ns_g_loss``
* hinge GAN (SoundStream): ``hinge_d_loss`` / ``hinge_g_loss``
* ``r1_penalty``: ||grad_x D(x)||^2 on real data (Mescheder et al. 2018)
* ``LecamEma`` + ``lecam_loss``: LeCam regulariser against EMA anchors of the logits
* ``feature_matching_loss``: L1 between discriminator features of real and fake
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _mean_f32(x):
    return jnp.mean(x.astype(jnp.float32))


def ns_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))."""
    return _mean_f32(jax.nn.softplus(-real_logits)) + _mean_f32(jax.nn.softplus(fake_logits))


def ns_g_loss(fake_logits: jax.Array) -> jax.Array:
    """-log sigmoid(D(G(z)))."""
    return _mean_f32(jax.nn.softplus(-fake_logits))


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    return _mean_f32(jax.nn.relu(1.0 - real_logits)) + _mean_f32(jax.nn.relu(1.0 + fake_logits))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    return -_mean_f32(fake_logits)


def r1_penalty(discriminator: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """Mean over the batch of ||d sum(D(x)) / dx||^2 at real samples (f32)."""
    grads = jax.grad(lambda x: jnp.sum(discriminator(x).astype(jnp.float32)))(real)
    per_example = jnp.sum(jnp.square(grads.astype(jnp.float32)).reshape(grads.shape[0], -1), axis=-1)
    return jnp.mean(per_example)


class LecamEma(nnx.Variable):
    """EMA anchors of the discriminator's mean real / fake logits (not gradient-trained)."""


def lecam_init() -> LecamEma:
    return LecamEma(jnp.zeros((2,), jnp.float32))


def lecam_update(anchors: jax.Array, real_logits: jax.Array, fake_logits: jax.Array,
                 decay: float = 0.999) -> jax.Array:
    """New anchors [ema_real, ema_fake] after one step (pure; the caller stores them)."""
    current = jnp.stack([_mean_f32(real_logits), _mean_f32(fake_logits)])
    return decay * anchors + (1.0 - decay) * jax.lax.stop_gradient(current)


def lecam_loss(real_logits: jax.Array, fake_logits: jax.Array, anchors: jax.Array) -> jax.Array:
    """||D(x) - ema_fake||^2 + ||D(G(z)) - ema_real||^2 (Tseng et al. 2021)."""
    ema_real, ema_fake = anchors[0], anchors[1]
    return (_mean_f32(jnp.square(jax.nn.relu(real_logits - ema_fake)))
            + _mean_f32(jnp.square(jax.nn.relu(ema_real - fake_logits))))


def feature_matching_loss(real_features: Sequence[jax.Array], fake_features: Sequence[jax.Array]) -> jax.Array:
    """Mean over layers of the relative L1 distance between real and fake features."""
    if len(real_features) != len(fake_features):
        raise ValueError(f"feature lists differ in length: {len(real_features)} vs {len(fake_features)}")
    total = jnp.float32(0.0)
    for real, fake in zip(real_features, fake_features):
        real = jax.lax.stop_gradient(real.astype(jnp.float32))
        total = total + jnp.mean(jnp.abs(real - fake.astype(jnp.float32))) / (jnp.mean(jnp.abs(real)) + 1e-6)
    return total / max(len(real_features), 1)


def adaptive_weight(reconstruction_grad_norm: jax.Array, adversarial_grad_norm: jax.Array,
                    max_weight: float = 1e4) -> jax.Array:
    """VQGAN's balance: ||grad L_rec|| / ||grad L_adv|| at the last decoder layer, clipped."""
    return jnp.clip(reconstruction_grad_norm / (adversarial_grad_norm + 1e-6), 0.0, max_weight)
