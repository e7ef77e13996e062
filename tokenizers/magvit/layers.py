"""Building blocks of the causal 3D CNN: causal convolution, per-frame GroupNorm, residual
block, adaptive GroupNorm and depth-to-space upsampling.

Layout everywhere: video activations are ``[batch, time, height, width, channels]`` (NDHWC) and
convolution kernels ``[k_t, k_h, k_w, in, out]``.

Causality: a causal convolution pads ``k_t - 1`` zero frames at the front only, so output frame
``t`` depends on input frames ``<= t``; GroupNorm statistics are taken per frame. Together they
make the encoder exactly causal: frame 0 is encoded as if it were an image.
"""
from __future__ import annotations

from typing import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from videolm import parallel

# How a 3D convolution is computed (the same math; speed differs per backend and shape).
#   'xla3d':     one conv_general_dilated over (T, H, W).
#   'fold_time': the k_t time taps are stacked along channels, then one 2D conv over
#                (batch*time, H, W) with k_t*C input channels.
#   'sum2d':     k_t 2D convs over (batch*time, H, W), summed.
CONV_IMPLS = ("xla3d", "fold_time", "sum2d")

_DEFAULT_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _triple(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1), *,
           causal: bool = True, impl: str = "fold_time") -> jax.Array:
    """3D convolution of ``x`` [B, T, H, W, C] with ``kernel`` [kt, kh, kw, C, O].

    Time is padded with ``kt - 1`` zero frames at the front (``causal=True``) or split evenly
    (``causal=False``); space with ``k // 2`` on both sides. Output frames:
    ``(T - 1) // s_t + 1`` when causal; spatial size ``(H - 1) // s_h + 1`` for odd kernels.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    kt, kh, kw = kernel.shape[:3]
    st, sh, sw = strides
    if kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"conv3d: input has {x.shape[-1]} channels, kernel expects {kernel.shape[3]}")
    time_pad = (kt - 1, 0) if causal else ((kt - 1) // 2, kt // 2)
    space_pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if kt == 1 and kh == 1 and kw == 1:
        return jnp.einsum("bthwc,co->bthwo", x[:, ::st, ::sh, ::sw], kernel[0, 0, 0])
    if impl == "xla3d" or kt == 1:
        if kt == 1:
            x = x[:, ::st]
        else:
            x = jnp.pad(x, ((0, 0), time_pad, (0, 0), (0, 0), (0, 0)))
        batch, frames = x.shape[:2]
        if kt == 1:  # a 2D convolution per frame
            y = jax.lax.conv_general_dilated(
                x.reshape((-1,) + x.shape[2:]), kernel[0], (sh, sw), space_pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y.reshape((batch, frames) + y.shape[1:])
        return jax.lax.conv_general_dilated(
            x, kernel, (st, sh, sw), (((0, 0),) + space_pad),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    x = jnp.pad(x, ((0, 0), time_pad, (0, 0), (0, 0), (0, 0)))
    out_frames = (x.shape[1] - kt) // st + 1
    taps = [x[:, i:i + st * (out_frames - 1) + 1:st] for i in range(kt)]   # kt x [B, T', H, W, C]
    batch = x.shape[0]

    def conv2d(inputs, k2d):
        y = jax.lax.conv_general_dilated(
            inputs.reshape((-1,) + inputs.shape[2:]), k2d, (sh, sw), space_pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape((batch, out_frames) + y.shape[1:])

    if impl == "fold_time":
        stacked = jnp.concatenate(taps, axis=-1)                           # [B, T', H, W, kt*C]
        k2d = einops.rearrange(kernel, "t h w c o -> h w (t c) o")
        return conv2d(stacked, k2d)
    out = conv2d(taps[0], kernel[0])
    for i in range(1, kt):
        out = out + conv2d(taps[i], kernel[i])
    return out


class Conv3d(nnx.Module):
    """A (causal by default) 3D convolution with ``[kt, kh, kw, in, out]`` kernel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, strides=1, *,
                 use_bias: bool = True, causal: bool = True, conv_impl: str = "fold_time",
                 dtype=jnp.float32, out_axis: str | None = "conv_out", kernel_init=_DEFAULT_INIT,
                 rngs: nnx.Rngs):
        kernel_size, self.strides = _triple(kernel_size), _triple(strides)
        self.causal, self.conv_impl, self.dtype = causal, conv_impl, dtype
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        shape = kernel_size + (in_channels, out_channels)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32),
                                out_sharding=(None, None, None, "conv_in", out_axis))
        self.bias = (nnx.Param(jnp.zeros((out_channels,), jnp.float32), out_sharding=(out_axis,))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.strides,
                   causal=self.causal, impl=self.conv_impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def num_groups_for(channels: int, groups: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


def frame_group_norm(x: jax.Array, num_groups: int, eps: float = 1e-6) -> jax.Array:
    """GroupNorm of [B, T, H, W, C] with statistics per frame (over H, W and C / G); f32 stats."""
    b, t, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, t, h, w, num_groups, c // num_groups)
    mean = jnp.mean(xf, axis=(2, 3, 5), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(2, 3, 5), keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape).astype(x.dtype)


class GroupNorm(nnx.Module):
    """Per-frame GroupNorm (causal); ``affine=False`` drops scale and bias."""

    def __init__(self, channels: int, groups: int = 32, *, affine: bool = True, eps: float = 1e-6):
        self.num_groups, self.eps = num_groups_for(channels, groups), eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = frame_group_norm(x, self.num_groups, self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return y


class ResBlock(nnx.Module):
    """GN, SiLU, conv, GN, SiLU, conv (no biases) plus a skip (1x1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, temporal_kernel: int = 3,
                 conv_impl: str = "fold_time", dtype=jnp.float32, rngs: nnx.Rngs):
        kernel = (temporal_kernel, 3, 3)
        self.norm1 = GroupNorm(in_channels, groups)
        self.conv1 = Conv3d(in_channels, out_channels, kernel, use_bias=False, conv_impl=conv_impl,
                            dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, groups)
        self.conv2 = Conv3d(out_channels, out_channels, kernel, use_bias=False, conv_impl=conv_impl,
                            dtype=dtype, rngs=rngs)
        self.skip = (Conv3d(in_channels, out_channels, 1, use_bias=False, dtype=dtype, rngs=rngs)
                     if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


def causal_time_index(out_frames: int, in_frames: int) -> jax.Array:
    """For each of ``out_frames`` frames, the latent frame (of ``in_frames``) that covers it:
    ``t -> ceil(t * (in - 1) / (out - 1))``; frame 0 maps to latent frame 0."""
    if in_frames == out_frames:
        return jnp.arange(out_frames)
    if out_frames == 1 or in_frames == 1:
        return jnp.zeros((out_frames,), jnp.int32)
    t = jnp.arange(out_frames)
    return (t * (in_frames - 1) + (out_frames - 2)) // (out_frames - 1)


def causal_resize(z: jax.Array, frames: int, height: int, width: int) -> jax.Array:
    """Nearest resize of a latent map [B, T', H', W', C] to (frames, height, width), causal in time."""
    if z.shape[1] != frames:
        z = jnp.take(z, causal_time_index(frames, z.shape[1]), axis=1)
    if height % z.shape[2] or width % z.shape[3]:
        raise ValueError(f"causal_resize: {z.shape[2:4]} does not divide ({height}, {width})")
    z = jnp.repeat(z, height // z.shape[2], axis=2)
    return jnp.repeat(z, width // z.shape[3], axis=3)


class AdaptiveGroupNorm(nnx.Module):
    """GroupNorm(affine=False)(x) * (1 + gamma(zq)) + beta(zq); gamma and beta are a 1x1x1 conv of
    the quantized latent, computed at latent resolution and resized causally to x.

    The projection starts at zero, so an untrained decoder normalises plainly.
    """

    def __init__(self, channels: int, latent_channels: int, groups: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups, affine=False)
        self.proj = Conv3d(latent_channels, 2 * channels, 1, dtype=dtype,
                           kernel_init=jax.nn.initializers.zeros, rngs=rngs)

    def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
        gamma_beta = self.proj(zq.astype(x.dtype))
        gamma_beta = causal_resize(gamma_beta, *x.shape[1:4])
        gamma, beta = jnp.split(gamma_beta, 2, axis=-1)
        return self.norm(x) * (1.0 + gamma) + beta


class DepthToSpaceUpsample(nnx.Module):
    """Causal conv to C_out * s_t * s_h * s_w channels, rearranged into time and space; the first
    ``s_t - 1`` frames are dropped so 1 + t latent frames become 1 + s_t * t."""

    def __init__(self, in_channels: int, out_channels: int, time_factor: int, space_factor: int = 2, *,
                 temporal_kernel: int = 3, conv_impl: str = "fold_time", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.time_factor, self.space_factor = time_factor, space_factor
        out = out_channels * time_factor * space_factor * space_factor
        self.conv = Conv3d(in_channels, out, (temporal_kernel, 3, 3), conv_impl=conv_impl, dtype=dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        st, ss = self.time_factor, self.space_factor
        y = einops.rearrange(self.conv(x), "b t h w (st sh sw c) -> b (t st) (h sh) (w sw) c",
                             st=st, sh=ss, sw=ss)
        return y[:, st - 1:]


def constrain_video(x: jax.Array) -> jax.Array:
    """Keeps video activations sharded over the batch (a no-op outside a mesh)."""
    return parallel.constrain(x, ("batch", None, None, None, None))
