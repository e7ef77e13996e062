"""SoundStream's causal 1D convolutional encoder and decoder.

Layout is ``[batch, time, channels]`` throughout. Every convolution is causal: it pads
``(kernel - 1) * dilation - (stride - 1)`` samples at the front only, so a clip of ``S`` samples
gives ``S // hop`` latent frames (34,000 samples at hop 320 -> 106 frames), latent frame ``t``
depends on samples ``< (t + 1) * hop`` only, and decoded samples ``< t * hop`` depend on latent
frames ``< t`` only.

Encoder::

    CausalConv(1 -> C, k=7)
    for stride s (channels c -> 2c): 3 residual units at c (dilations 1, 3, 9), ELU,
        CausalConv(c -> 2c, k=2s, stride s)
    ELU, CausalConv(C * 2^len(strides) -> D, k=3)

Decoder (the mirror)::

    CausalConv(D -> C * 2^len(strides), k=7)
    for stride s reversed (channels c -> c/2): ELU, CausalUpsample(c -> c/2, s), 3 residual units
    ELU, CausalConv(C -> 1, k=7)

Residual unit: ``x + Conv_k1(ELU(CausalConv_k7_dilated(ELU(x))))``; no normalisation layers.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tokenizers.soundstream.rvq import ResidualVQ
from videolm import parallel

RESIDUAL_DILATIONS = (1, 3, 9)


def _kernel_init(scale: float):
    init = (nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=-1)
            if scale > 0 else nnx.initializers.zeros_init())
    return nnx.with_partitioning(init, ("conv_window", "conv_in", "conv_out"))


class CausalConv1d(nnx.Module):
    """Conv1d that sees only the present and the past: ``[B, T, Cin] -> [B, T // stride, Cout]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, init_scale: float = 1.0, rngs: nnx.Rngs):
        pad = (kernel_size - 1) * dilation - (stride - 1)
        if pad < 0:
            raise ValueError(f"CausalConv1d: kernel_size {kernel_size} is shorter than stride {stride}")
        self.conv = nnx.Conv(
            in_channels, out_channels, kernel_size=(kernel_size,), strides=(stride,),
            kernel_dilation=(dilation,), padding=[(pad, 0)], kernel_init=_kernel_init(init_scale),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class CausalUpsample(nnx.Module):
    """Causal transposed convolution (kernel 2s, stride s): ``[B, T, Cin] -> [B, T * s, Cout]``.

    Output sample ``t * s + r`` depends on input frames ``t`` and ``t - 1`` only. Written as a
    kernel-2 causal convolution to ``s * Cout`` channels followed by depth-to-space, which is the
    same linear map as a ``ConvTranspose(k=2s, stride=s)`` cropped to its first ``T * s`` outputs
    and runs as one ordinary convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.out_channels = out_channels
        self.conv = CausalConv1d(in_channels, stride * out_channels, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)                                           # [B, T, s * Cout]
        batch, frames, _ = y.shape
        return y.reshape(batch, frames * self.stride, self.out_channels)


class ResidualUnit(nnx.Module):
    """``x + Conv_k1(ELU(CausalConv_k7_dilated(ELU(x))))``; the k1 conv starts at zero, so every
    unit starts as the identity and the deep stack trains without normalisation layers."""

    def __init__(self, channels: int, dilation: int, *, rngs: nnx.Rngs):
        self.dilated = CausalConv1d(channels, channels, 7, dilation=dilation, rngs=rngs)
        self.pointwise = CausalConv1d(channels, channels, 1, init_scale=0.0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.pointwise(jax.nn.elu(self.dilated(jax.nn.elu(x))))


class EncoderBlock(nnx.Module):
    def __init__(self, channels: int, stride: int, *, rngs: nnx.Rngs):
        self.units = nnx.List([ResidualUnit(channels, d, rngs=rngs) for d in RESIDUAL_DILATIONS])
        self.down = CausalConv1d(channels, 2 * channels, 2 * stride, stride=stride, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for unit in self.units:
            x = unit(x)
        return self.down(jax.nn.elu(x))


class DecoderBlock(nnx.Module):
    def __init__(self, channels: int, stride: int, *, rngs: nnx.Rngs):
        self.up = CausalUpsample(channels, channels // 2, stride, rngs=rngs)
        self.units = nnx.List([ResidualUnit(channels // 2, d, rngs=rngs) for d in RESIDUAL_DILATIONS])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.up(jax.nn.elu(x))
        for unit in self.units:
            x = unit(x)
        return x


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    if not strides or any(s < 1 for s in strides):
        raise ValueError(f"strides {strides}: expected a non-empty sequence of positive integers")
    return strides


class Encoder(nnx.Module):
    """Waveform ``[B, S]`` -> latents ``[B, S // hop, latent_dim]``."""

    def __init__(self, channels: int, latent_dim: int, strides: Sequence[int], *, rngs: nnx.Rngs):
        self.strides = _check_strides(strides)
        self.stem = CausalConv1d(1, channels, 7, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(channels * 2 ** i, s, rngs=rngs)
                                for i, s in enumerate(self.strides)])
        self.head = CausalConv1d(channels * 2 ** len(self.strides), latent_dim, 3, rngs=rngs)

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    def __call__(self, waveform: jax.Array) -> jax.Array:
        if waveform.ndim != 2:
            raise ValueError(f"Encoder: expected a waveform batch [batch, samples], got shape {waveform.shape}")
        if waveform.shape[1] < self.hop:
            raise ValueError(f"Encoder: {waveform.shape[1]} samples is shorter than one hop ({self.hop})")
        x = self.stem(waveform[..., None])
        for block in self.blocks:
            x = parallel.constrain(x, ("batch", "length", None))
            x = block(x)
        return self.head(jax.nn.elu(x))


class Decoder(nnx.Module):
    """Latents ``[B, T, latent_dim]`` -> waveform ``[B, T * hop]``."""

    def __init__(self, channels: int, latent_dim: int, strides: Sequence[int], *, rngs: nnx.Rngs):
        self.strides = _check_strides(strides)
        top = channels * 2 ** len(self.strides)
        self.stem = CausalConv1d(latent_dim, top, 7, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(top // 2 ** i, s, rngs=rngs)
                                for i, s in enumerate(reversed(self.strides))])
        # Starts silent: the first updates fit a read-out of the features instead of unlearning
        # noise. (Needs a waveform term in the loss: at exactly 0 the spectral losses have no
        # gradient, |STFT| being flat there.)
        self.head = CausalConv1d(channels, 1, 7, init_scale=0.0, rngs=rngs)

    def __call__(self, latents: jax.Array) -> jax.Array:
        x = self.stem(latents)
        for block in self.blocks:
            x = parallel.constrain(x, ("batch", "length", None))
            x = block(x)
        return self.head(jax.nn.elu(x))[..., 0]


class SoundStream(nnx.Module):
    """The codec: ``encoder`` -> ``quantizer`` (residual VQ) -> ``decoder``.

    ``encode`` maps a waveform batch ``[B, S]`` to codes ``[B, S // hop, levels]``; ``decode`` maps
    the codes of the first ``n`` levels back to ``[B, frames * hop]`` samples.
    """

    def __init__(self, *, channels: int, latent_dim: int, strides: Sequence[int], num_levels: int,
                 codebook_size: int, ema_decay: float = 0.99, dead_code_threshold: float = 2.0,
                 kmeans_iterations: int = 10, rngs: nnx.Rngs):
        self.encoder = Encoder(channels, latent_dim, strides, rngs=rngs)
        self.quantizer = ResidualVQ(num_levels, codebook_size, latent_dim, decay=ema_decay,
                                    dead_code_threshold=dead_code_threshold,
                                    kmeans_iterations=kmeans_iterations, rngs=rngs)
        self.decoder = Decoder(channels, latent_dim, strides, rngs=rngs)

    @property
    def hop(self) -> int:
        return self.encoder.hop

    def encode(self, waveform: jax.Array, num_levels: int | None = None) -> jax.Array:
        return self.quantizer.encode(self.encoder(waveform), num_levels)

    def decode(self, codes: jax.Array) -> jax.Array:
        return self.decoder(self.quantizer.decode(codes))


def build_codec(model_config, *, rngs: nnx.Rngs) -> SoundStream:
    """The codec described by a config's ``model`` section."""
    return SoundStream(channels=model_config.channels, latent_dim=model_config.latent_dim,
                       strides=tuple(model_config.strides), num_levels=model_config.num_levels,
                       codebook_size=model_config.codebook_size, ema_decay=model_config.ema_decay,
                       dead_code_threshold=model_config.dead_code_threshold,
                       kmeans_iterations=model_config.kmeans_iterations, rngs=rngs)
