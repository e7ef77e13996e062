"""SoundStream's discriminators: a complex-STFT 2D discriminator and a multi-scale waveform one.

Each returns, for every sub-discriminator, ``(logits, features)``: the logits of that
sub-discriminator and the list of its intermediate activations (for feature matching).
Discriminators see whole clips and need not be causal.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tokenizers.soundstream.losses import stft

Outputs = list[tuple[jax.Array, list[jax.Array]]]


def _leaky(x):
    return jax.nn.leaky_relu(x, 0.2)


def _conv(cin, cout, kernel, *, stride=1, groups=1, rngs):
    kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,)
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * len(kernel)
    padding = [((k - 1) // 2, k // 2) for k in kernel]
    return nnx.Conv(cin, cout, kernel_size=kernel, strides=stride, padding=padding,
                    feature_group_count=groups, rngs=rngs)


class WaveformDiscriminator(nnx.Module):
    """MelGAN-style 1D discriminator on one time scale: ``[B, S] -> (logits [B, S', 1], features)``."""

    def __init__(self, channels: int, num_downsamples: int, max_channels: int, *, rngs: nnx.Rngs):
        layers = [_conv(1, channels, 15, rngs=rngs)]
        c = channels
        for _ in range(num_downsamples):
            out = min(4 * c, max_channels)
            layers.append(_conv(c, out, 41, stride=4, groups=max(c // 4, 1), rngs=rngs))
            c = out
        layers.append(_conv(c, c, 5, rngs=rngs))
        self.layers = nnx.List(layers)
        self.out = _conv(c, 1, 3, rngs=rngs)

    def __call__(self, waveform: jax.Array):
        x = waveform[..., None]
        features = []
        for layer in self.layers:
            x = _leaky(layer(x))
            features.append(x)
        return self.out(x), features


class MultiScaleWaveformDiscriminator(nnx.Module):
    """``num_scales`` waveform discriminators on the signal average-pooled by 1, 2, 4, ..."""

    def __init__(self, num_scales: int = 3, channels: int = 16, num_downsamples: int = 4,
                 max_channels: int = 1024, *, rngs: nnx.Rngs):
        self.discriminators = nnx.List([
            WaveformDiscriminator(channels, num_downsamples, max_channels, rngs=rngs)
            for _ in range(num_scales)])

    def __call__(self, waveform: jax.Array) -> Outputs:
        outputs = []
        x = waveform
        for i, disc in enumerate(self.discriminators):
            if i:
                x = nnx.avg_pool(x[..., None], (4,), strides=(2,), padding=[(1, 1)])[..., 0]
            outputs.append(disc(x))
        return outputs


class STFTDiscriminator(nnx.Module):
    """2D convolutions over the complex STFT (real and imaginary parts as 2 channels).

    Layout ``[B, time, freq, 2]``; each block is a 3x3 conv and a strided (s_t + 2) x (s_f + 2)
    conv, with strides alternating (1, 2) and (2, 2); the last conv spans the remaining
    frequency axis and gives one logit per time step.
    """

    def __init__(self, channels: int = 32, n_fft: int = 1024, hop: int = 256,
                 channel_mults: Sequence[int] = (2, 4, 4, 8, 8, 16), *, rngs: nnx.Rngs):
        self.n_fft, self.hop = n_fft, hop
        self.stem = _conv(2, channels, (7, 7), rngs=rngs)
        blocks, c, freq = [], channels, n_fft // 2
        for i, mult in enumerate(channel_mults):
            stride = (1, 2) if i % 2 == 0 else (2, 2)
            out = channels * mult
            blocks.append(nnx.List([_conv(c, c, (3, 3), rngs=rngs),
                                    _conv(c, out, (stride[0] + 2, stride[1] + 2), stride=stride, rngs=rngs)]))
            c, freq = out, -(-freq // stride[1])
        self.blocks = nnx.List(blocks)
        self.out = nnx.Conv(c, 1, kernel_size=(1, freq), padding="VALID", rngs=rngs)

    def __call__(self, waveform: jax.Array) -> Outputs:
        spec = stft(waveform, self.n_fft, self.hop)[..., :-1]          # drop Nyquist: n_fft/2 bins
        x = jnp.stack([spec.real, spec.imag], axis=-1) * (self.n_fft ** 0.5)
        x = _leaky(self.stem(x))
        features = [x]
        for conv3, strided in self.blocks:
            x = _leaky(strided(_leaky(conv3(x))))
            features.append(x)
        return [(self.out(x), features)]


class Discriminators(nnx.Module):
    """Both discriminators; ``__call__`` returns the outputs of every sub-discriminator."""

    def __init__(self, *, stft_channels: int, stft_n_fft: int, stft_hop: int,
                 stft_channel_mults: Sequence[int], wave_scales: int, wave_channels: int,
                 wave_downsamples: int, wave_max_channels: int, rngs: nnx.Rngs):
        self.stft = STFTDiscriminator(stft_channels, stft_n_fft, stft_hop, stft_channel_mults, rngs=rngs)
        self.wave = MultiScaleWaveformDiscriminator(wave_scales, wave_channels, wave_downsamples,
                                                    wave_max_channels, rngs=rngs)

    def __call__(self, waveform: jax.Array) -> Outputs:
        return self.stft(waveform) + self.wave(waveform)
