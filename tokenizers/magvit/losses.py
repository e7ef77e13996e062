"""MAGVIT-v2 training objectives.

Generator (tokenizer)::

    recon_weight * L2(recon, video)                                   5.0
  + perceptual_weight * LPIPS-VGG(recon, video) on sampled frames     0.1 (after perceptual_start_step)
  + commitment_weight * ||z - sg(q)||^2                               0.25
  + entropy_weight(step) * (E[H(p(c|z))] - H(E[p(c|z)]))              0.1, x3 decaying to x1
  + gan_weight * non-saturating G loss  (after gan_start_step)        0.1

Discriminator::

    non-saturating D loss + lecam_weight * LeCam + r1_weight * R1     (R1 every r1_every steps,
                                                                       scaled by r1_every: lazy)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokenizers import gan
from tokenizers.magvit import lfq


@dataclasses.dataclass(frozen=True)
class LossConfig:
    recon_weight: float = 5.0
    perceptual_weight: float = 0.1
    perceptual_frames: int = 2          # frames per clip scored by LPIPS (0: every frame)
    perceptual_start_step: int = 0
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    entropy_start_multiplier: float = 3.0
    entropy_anneal_steps: int = 2000
    entropy_temperature: float = 0.01
    entropy_bits_per_group: int = 9
    diversity_weight: float = 1.0
    gan_weight: float = 0.1
    gan_start_step: int = 0
    r1_weight: float = 10.0
    r1_every: int = 4
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999

    @classmethod
    def from_config(cls, loss_config, lfq_config) -> "LossConfig":
        """From ``config.loss`` and ``config.lfq``; unknown keys are an error."""
        values = dict(loss_config.to_dict())
        for key, value in lfq_config.to_dict().items():
            if key in values:
                raise ValueError(f"config.lfq.{key} duplicates config.loss.{key}")
            values[key] = value
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown keys in config.loss / config.lfq: {sorted(unknown)}; expected {sorted(fields)}")
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        for name in ("recon_weight", "perceptual_weight", "commitment_weight", "entropy_weight",
                     "gan_weight", "r1_weight", "lecam_weight", "diversity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss {name} must be >= 0, got {getattr(self, name)}")
        if self.gan_start_step < 0 or self.perceptual_start_step < 0:
            raise ValueError("loss gan_start_step and perceptual_start_step must be >= 0")
        if self.r1_every < 1:
            raise ValueError(f"loss r1_every must be >= 1, got {self.r1_every}")
        if self.perceptual_frames < 0:
            raise ValueError(f"loss perceptual_frames must be >= 0, got {self.perceptual_frames}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"loss lecam_decay must be in [0, 1), got {self.lecam_decay}")


def sample_frames(video: jax.Array, recon: jax.Array, num_frames: int, rng) -> tuple[jax.Array, jax.Array]:
    """The same ``num_frames`` random frames of each clip from both, as [B * num_frames, H, W, 3]."""
    b, t = video.shape[:2]
    if num_frames == 0 or num_frames >= t:
        return video.reshape((-1,) + video.shape[2:]), recon.reshape((-1,) + recon.shape[2:])
    idx = jax.vmap(lambda k: jax.random.choice(k, t, (num_frames,), replace=False))(jax.random.split(rng, b))
    take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None, None], axis=1)
    return take(video).reshape((-1,) + video.shape[2:]), take(recon).reshape((-1,) + recon.shape[2:])


def generator_loss(tokenizer, video: jax.Array, *, step, rng, cfg: LossConfig, lpips_fn=None,
                   discriminator=None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """Total generator loss, its parts and the reconstruction.

    Args:
      tokenizer: the MagvitTokenizer.
      video: [B, T, H, W, 3] f32 in [-1, 1].
      step: the training step (entropy-weight annealing).
      lpips_fn: ``(x, y) -> [N]`` LPIPS distances, or None to skip the perceptual term.
      discriminator: when given, adds the non-saturating generator loss.
    """
    recon, aux = tokenizer(video)
    z = aux["z"]
    recon_loss = jnp.mean(jnp.square(recon - video))
    commit = lfq.commitment_loss(z)
    ent, ent_parts = lfq.entropy_loss(z, temperature=cfg.entropy_temperature,
                                      bits_per_group=cfg.entropy_bits_per_group,
                                      diversity_weight=cfg.diversity_weight)
    ent_w = lfq.entropy_weight_at(step, base_weight=cfg.entropy_weight,
                                  start_multiplier=cfg.entropy_start_multiplier,
                                  anneal_steps=cfg.entropy_anneal_steps)
    total = cfg.recon_weight * recon_loss + cfg.commitment_weight * commit + ent_w * ent
    metrics = {"recon_loss": recon_loss, "commitment_loss": commit, "entropy_loss": ent,
               "entropy_weight": ent_w, **ent_parts}
    if lpips_fn is not None and cfg.perceptual_weight > 0:
        real_frames, fake_frames = sample_frames(video, recon, cfg.perceptual_frames, rng)
        perceptual = jnp.mean(lpips_fn(fake_frames, real_frames))
        total = total + cfg.perceptual_weight * perceptual
        metrics["perceptual_loss"] = perceptual
    if discriminator is not None:
        g_adv = gan.ns_g_loss(discriminator(recon))
        total = total + cfg.gan_weight * g_adv
        metrics["gan_g_loss"] = g_adv
    tokens = aux["tokens"]
    mse01 = jnp.mean(jnp.square((jnp.clip(recon, -1, 1) - video) / 2.0))
    metrics["psnr"] = -10.0 * jnp.log10(jnp.maximum(mse01, 1e-10))
    metrics["batch_codebook_usage"] = jnp.mean(
        jnp.bincount(tokens.reshape(-1), length=tokenizer.vocab_size) > 0)
    metrics["loss"] = total
    return total, (metrics, recon)


def discriminator_loss(discriminator, real: jax.Array, fake: jax.Array, lecam_anchors: jax.Array, *,
                       cfg: LossConfig, apply_r1) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """Non-saturating D loss + LeCam + lazy R1 (``apply_r1``: traced bool). Returns the loss,
    metrics and the updated LeCam anchors."""
    fake = jax.lax.stop_gradient(fake)
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    d_loss = gan.ns_d_loss(real_logits, fake_logits)
    lecam = gan.lecam_loss(real_logits, fake_logits, lecam_anchors)
    new_anchors = gan.lecam_update(lecam_anchors, real_logits, fake_logits, cfg.lecam_decay)
    if cfg.r1_weight > 0:
        r1 = jax.lax.cond(apply_r1, lambda: gan.r1_penalty(discriminator, real), lambda: jnp.float32(0.0))
        r1_term = cfg.r1_weight * cfg.r1_every * r1
    else:
        r1 = r1_term = jnp.float32(0.0)
    total = d_loss + cfg.lecam_weight * lecam + r1_term
    metrics = {"disc_loss": d_loss, "lecam_loss": lecam, "r1_penalty": r1,
               "logits_real": jnp.mean(real_logits), "logits_fake": jnp.mean(fake_logits),
               "disc_total": total}
    return total, (metrics, new_anchors)
