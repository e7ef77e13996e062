"""StyleGAN-style 3D discriminator with blur pooling (MAGVIT-v2's adversarial critic).

    conv_in   3x3x3 conv 3 -> C * m_0, leaky ReLU
    block i   3x3x3 conv, leaky ReLU, blur-pool downsample, 3x3x3 conv (-> C * m_i), leaky ReLU;
              skip: blur-pool downsample, 1x1x1 conv; (main + skip) / sqrt(2)
    head      3x3x3 conv, leaky ReLU, mean over (T, H, W), dense, leaky ReLU, dense -> 1 logit

Blur pooling filters with the separable [1, 3, 3, 1] / 8 kernel before subsampling by 2 (anti-
aliasing), in space always and in time while there is more than one frame. Convolutions are
non-causal (the critic sees the whole clip). The global mean makes the critic independent of the
clip size, so the same weights judge 1-frame images and 17-frame videos.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizers.magvit.layers import Conv3d, constrain_video

_BLUR_TAPS = np.array([1.0, 3.0, 3.0, 1.0], np.float32) / 8.0


def blur_downsample(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Filters x [B, T, H, W, C] with [1, 3, 3, 1] / 8 along each axis in ``axes`` and keeps every
    second sample (padding 1 before and 2 after: n -> ceil(n / 2))."""
    for axis in axes:
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 2)
        xp = jnp.pad(x, pad)
        out_len = (n + 1) // 2
        acc = 0.0
        for k, w in enumerate(_BLUR_TAPS):
            acc = acc + w * jax.lax.slice_in_dim(xp, k, k + 2 * (out_len - 1) + 1, 2, axis=axis)
        x = acc.astype(x.dtype)
    return x


def _down_axes(frames: int) -> tuple[int, ...]:
    return (1, 2, 3) if frames > 1 else (2, 3)


class DiscriminatorBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, conv_impl: str, dtype, rngs: nnx.Rngs):
        common = dict(causal=False, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        self.conv1 = Conv3d(in_channels, in_channels, 3, **common)
        self.conv2 = Conv3d(in_channels, out_channels, 3, **common)
        self.skip = Conv3d(in_channels, out_channels, 1, use_bias=False, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = _down_axes(x.shape[1])
        h = jax.nn.leaky_relu(self.conv1(x), 0.2)
        h = blur_downsample(h, axes)
        h = jax.nn.leaky_relu(self.conv2(h), 0.2)
        skip = self.skip(blur_downsample(x, axes))
        return (h + skip) / math.sqrt(2.0)


class Discriminator(nnx.Module):
    """Videos [B, T, H, W, 3] in [-1, 1] -> logits f32 [B]."""

    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int],
                 conv_impl: str = "fold_time", dtype=jnp.float32, rngs: nnx.Rngs):
        if base_channels < 1 or not channel_multipliers:
            raise ValueError("discriminator base_channels must be >= 1 and channel_multipliers non-empty")
        chans = [base_channels * m for m in channel_multipliers]
        self.dtype = dtype
        self.conv_in = Conv3d(3, chans[0], 3, causal=False, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List()
        c = chans[0]
        for ch in chans:
            self.blocks.append(DiscriminatorBlock(c, ch, conv_impl=conv_impl, dtype=dtype, rngs=rngs))
            c = ch
        self.conv_out = Conv3d(c, c, 3, causal=False, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        self.dense1 = nnx.Linear(c, c, rngs=rngs)
        self.dense2 = nnx.Linear(c, 1, rngs=rngs)

    def __call__(self, video: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.conv_in(constrain_video(video.astype(self.dtype))), 0.2)
        for block in self.blocks:
            h = block(h)
        h = jax.nn.leaky_relu(self.conv_out(h), 0.2)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2, 3))
        h = jax.nn.leaky_relu(self.dense1(h), 0.2)
        return self.dense2(h)[:, 0]


def discriminator_from_config(disc_config, *, conv_impl: str, dtype, rngs: nnx.Rngs) -> Discriminator:
    return Discriminator(base_channels=disc_config.base_channels,
                         channel_multipliers=tuple(disc_config.channel_multipliers),
                         conv_impl=conv_impl, dtype=dtype, rngs=rngs)
