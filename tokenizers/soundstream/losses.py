"""Spectral reconstruction losses for the audio codec.

``multiscale_mel_loss`` compares mel spectrograms at several window sizes (64 ... 2048 samples,
hop = window / 4; one mel count for all of them or one per window): an L1 term on mel magnitudes
plus an L1 term on their log. The log term uses a
*relative floor*: ``floor`` is ``floor_db`` (about -40 dB) under the loudest mel bin of the
*original* clip at that scale and both spectrograms are compared as ``log(M + floor)``, so quiet
background noise far under the floor cannot outweigh a wrong pitch, and silence is not scored in
the noise of float precision. (Adding the floor rather than clamping at it keeps a gradient where
the reconstruction is still silent.)

``spectral_distance_db`` is the matching metric: the mean absolute difference in dB between the
floored log-mel spectrograms, averaged over the scales.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, num_mels: int) -> np.ndarray:
    """HTK-mel triangular filters ``[n_fft // 2 + 1, num_mels]`` (each filter peaks at 1)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), num_mels + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower[None]) / np.maximum(center - lower, 1e-9)[None]
    falling = (upper[None] - bins[:, None]) / np.maximum(upper - center, 1e-9)[None]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def frames(x: jax.Array, frame_length: int, hop: int) -> jax.Array:
    """Overlapping frames ``[B, S] -> [B, F, frame_length]`` with F = S // hop (front zero-padded
    by ``frame_length - hop`` so frame f ends at sample (f + 1) * hop). Needs hop | frame_length."""
    if frame_length % hop:
        raise ValueError(f"frames: hop {hop} must divide frame_length {frame_length}")
    batch, samples = x.shape
    count = samples // hop
    x = jnp.pad(x[:, :count * hop], ((0, 0), (frame_length - hop, 0)))
    chunks = x.reshape(batch, -1, hop)                                   # [B, F + r - 1, hop]
    r = frame_length // hop
    return jnp.concatenate([chunks[:, i:i + count] for i in range(r)], axis=-1)


def stft(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """Complex STFT ``[B, S] -> [B, S // hop, n_fft // 2 + 1]`` with a periodic Hann window,
    normalised by the window sum (a full-scale sinusoid peaks near 0.5)."""
    window = jnp.asarray(np.hanning(n_fft + 1)[:-1], jnp.float32)
    spec = jnp.fft.rfft(frames(x, n_fft, hop) * window, axis=-1)
    return spec / jnp.sum(window)


def mel_spectrogram(x: jax.Array, sample_rate: int, n_fft: int, num_mels: int) -> jax.Array:
    """Mel magnitude spectrogram ``[B, S] -> [B, S // (n_fft // 4), num_mels]``."""
    magnitude = jnp.abs(stft(x, n_fft, n_fft // 4))
    return magnitude @ jnp.asarray(mel_filterbank(sample_rate, n_fft, num_mels))


def _floored_log(reference: jax.Array, *others: jax.Array, floor_db: float):
    """``log10(M + floor)`` of each spectrogram, ``floor`` at ``floor_db`` under each clip's
    reference maximum."""
    peak = jnp.max(jax.lax.stop_gradient(reference), axis=(1, 2), keepdims=True)
    floor = jnp.maximum(peak * 10.0 ** (floor_db / 20.0), 1e-8)
    return [jnp.log10(s + floor) for s in (reference,) + others]


def mels_per_scale(scales: Sequence[int], num_mels) -> tuple[int, ...]:
    """``num_mels`` (an int for every scale, or one per scale) as one count per scale."""
    if isinstance(num_mels, int):
        return (num_mels,) * len(scales)
    counts = tuple(int(m) for m in num_mels)
    if len(counts) != len(scales) or min(counts) < 1:
        raise ValueError(f"num_mels {tuple(num_mels)}: expected a positive int or one per mel scale "
                         f"{tuple(scales)}")
    return counts


def _check_pair(original, reconstruction):
    if original.shape != reconstruction.shape or original.ndim != 2:
        raise ValueError(f"expected two [batch, samples] waveforms of equal shape, got {original.shape} "
                         f"and {reconstruction.shape}")


def _scaled_mels(original, reconstruction, sample_rate, scales, num_mels, floor_db):
    """Per scale: ``(mel_true, mel_pred, log_true, log_pred)`` with the relative floor."""
    _check_pair(original, reconstruction)
    for n_fft, mels in zip(scales, mels_per_scale(scales, num_mels)):
        mel_true = mel_spectrogram(original, sample_rate, n_fft, mels)
        mel_pred = mel_spectrogram(reconstruction, sample_rate, n_fft, mels)
        yield (mel_true, mel_pred, *_floored_log(mel_true, mel_pred, floor_db=floor_db))


def multiscale_mel_loss(original: jax.Array, reconstruction: jax.Array, *, sample_rate: int,
                        scales: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
                        num_mels: int | Sequence[int] = 64, floor_db: float = -40.0,
                        log_weight: float = 1.0) -> jax.Array:
    """Mean over scales of ``mean|M - M_hat| + log_weight * mean|log10(M + f) - log10(M_hat + f)|``
    with ``f`` the floor relative to the original's maximum (see the module docstring)."""
    total = jnp.float32(0.0)
    for mel_true, mel_pred, log_true, log_pred in _scaled_mels(original, reconstruction, sample_rate,
                                                               scales, num_mels, floor_db):
        total = total + jnp.mean(jnp.abs(mel_true - mel_pred)) + log_weight * jnp.mean(
            jnp.abs(log_true - log_pred))
    return total / len(scales)


def spectral_distance_db(original: jax.Array, reconstruction: jax.Array, *, sample_rate: int,
                         scales: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
                         num_mels: int | Sequence[int] = 64, floor_db: float = -40.0) -> jax.Array:
    """Per-example mean absolute log-mel difference in dB, averaged over scales: ``[B]``."""
    total = jnp.zeros((original.shape[0],), jnp.float32)
    for _, _, log_true, log_pred in _scaled_mels(original, reconstruction, sample_rate, scales, num_mels,
                                                 floor_db):
        total = total + 20.0 * jnp.mean(jnp.abs(log_true - log_pred), axis=(1, 2))
    return total / len(scales)
