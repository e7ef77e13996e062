"""MAGVIT-v2 video tokenizer: causal 3D CNN encoder, lookup-free quantizer, decoder with adaptive
GroupNorm.

Encoder::

    conv_in   causal conv 3 -> C * m_0
    level i   num_res_blocks x ResBlock (-> C * m_i); then, except after the last level, a strided
              causal conv (stride (s_t, 2, 2)); s_t = 2 where ``temporal_downsample[i]`` (the late
              levels), which maps 1 + s_t * t frames to 1 + t.
    mid       num_res_blocks x ResBlock
    out       GroupNorm, SiLU, 1x1x1 conv -> codebook_bits, GroupNorm(1 group, affine=False)

Decoder (mirror)::

    conv_in   causal conv bits -> C * m_top; AdaptiveGroupNorm + mid ResBlocks
    level i   (top to bottom) AdaptiveGroupNorm, ResBlocks (-> C * m_i), then depth-to-space
              upsampling by (s_t, 2, 2) that drops the first s_t - 1 frames
    out       GroupNorm, SiLU, causal conv -> 3

17 x 128 x 128 with channels x (1, 2, 2, 4) and temporal downsampling in the last two downsamplers
gives a 5 x 16 x 16 token grid. An image is a 1-frame video and gives the same tokens as the first
frame of any video that starts with it. ``temporal_kernel=1`` with no temporal downsampling is the
2D image tokenizer that ``inflate.py`` turns into the 3D one.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tokenizers.magvit import lfq
from videolm import parallel
from tokenizers.magvit.layers import (AdaptiveGroupNorm, Conv3d, DepthToSpaceUpsample, GroupNorm,
                                      ResBlock, constrain_video)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def latent_frames(num_frames: int, temporal_downsample: Sequence[bool]) -> int:
    """Latent frames for ``num_frames`` input frames: each temporal 2x maps 1 + 2t to 1 + t."""
    t = num_frames
    for down in temporal_downsample:
        if down:
            t = (t - 1) // 2 + 1
    return t


def check_video_shape(num_frames: int, height: int, width: int,
                      temporal_downsample: Sequence[bool]) -> None:
    """Raises ValueError unless the clip shape tokenizes exactly (and decodes back to itself)."""
    factor = 2 ** len(temporal_downsample)
    if height % factor or width % factor:
        raise ValueError(f"video height and width must be multiples of {factor}, got {height}x{width}")
    time_factor = 2 ** sum(bool(d) for d in temporal_downsample)
    if num_frames < 1 or (num_frames - 1) % time_factor:
        raise ValueError(f"video must have 1 + {time_factor} * k frames (1 for an image), got {num_frames}")


def token_shape(num_frames: int, height: int, width: int,
                temporal_downsample: Sequence[bool]) -> tuple[int, int, int]:
    """(t, h, w) of the token grid of a (num_frames, height, width) clip, without running the model."""
    check_video_shape(num_frames, height, width, temporal_downsample)
    factor = 2 ** len(temporal_downsample)
    return latent_frames(num_frames, temporal_downsample), height // factor, width // factor


def res_blocks_per_level(num_res_blocks, num_levels: int) -> tuple[int, ...]:
    """``num_res_blocks`` as one count per level (an int applies to every level; the middle
    blocks use the last level's count)."""
    if isinstance(num_res_blocks, int):
        blocks = (num_res_blocks,) * num_levels
    else:
        blocks = tuple(int(b) for b in num_res_blocks)
    if len(blocks) != num_levels or any(b < 0 for b in blocks):
        raise ValueError(f"num_res_blocks must be an int >= 0 or {num_levels} of them, got {num_res_blocks!r}")
    return blocks


class Encoder(nnx.Module):
    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int], num_res_blocks,
                 temporal_downsample: Sequence[bool], codebook_bits: int, num_groups: int,
                 temporal_kernel: int, conv_impl: str, dtype, rngs: nnx.Rngs):
        chans = [base_channels * m for m in channel_multipliers]
        blocks = res_blocks_per_level(num_res_blocks, len(chans))
        kernel = (temporal_kernel, 3, 3)
        common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        self.conv_in = Conv3d(3, chans[0], kernel, **common)
        self.levels = nnx.List()
        self.downsamplers = nnx.List()
        c = chans[0]
        for i, ch in enumerate(chans):
            self.levels.append(nnx.List([
                ResBlock(c if j == 0 else ch, ch, groups=num_groups, temporal_kernel=temporal_kernel, **common)
                for j in range(blocks[i])]))
            c = ch
            if i < len(chans) - 1:
                # A level without residual blocks gets its channel count from the downsampler.
                out = chans[i + 1] if blocks[i + 1] == 0 else c
                st = 2 if temporal_downsample[i] else 1
                self.downsamplers.append(Conv3d(c, out, kernel, (st, 2, 2), **common))
                c = out
        self.mid = nnx.List([ResBlock(c, c, groups=num_groups, temporal_kernel=temporal_kernel, **common)
                             for _ in range(blocks[-1])])
        self.norm_out = GroupNorm(c, num_groups)
        self.conv_out = Conv3d(c, codebook_bits, 1, dtype=dtype, out_axis=None, rngs=rngs)
        self.pre_quant_norm = GroupNorm(codebook_bits, 1, affine=False)

    def __call__(self, video: jax.Array) -> jax.Array:
        """[B, T, H, W, 3] in [-1, 1] -> pre-quantization latents f32 [B, t, h, w, bits]."""
        h = self.conv_in(constrain_video(video))
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        for block in self.mid:
            h = block(h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return self.pre_quant_norm(h.astype(jnp.float32))


class Decoder(nnx.Module):
    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int], num_res_blocks,
                 temporal_downsample: Sequence[bool], codebook_bits: int, num_groups: int,
                 temporal_kernel: int, conv_impl: str, dtype, rngs: nnx.Rngs):
        chans = [base_channels * m for m in channel_multipliers]
        blocks = res_blocks_per_level(num_res_blocks, len(chans))
        kernel = (temporal_kernel, 3, 3)
        common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        c = chans[-1]
        self.dtype = dtype
        self.conv_in = Conv3d(codebook_bits, c, kernel, **common)
        self.mid_norm = AdaptiveGroupNorm(c, codebook_bits, num_groups, dtype=dtype, rngs=rngs)
        self.mid = nnx.List([ResBlock(c, c, groups=num_groups, temporal_kernel=temporal_kernel, **common)
                             for _ in range(blocks[-1])])
        self.norms = nnx.List()
        self.levels = nnx.List()
        self.upsamplers = nnx.List()
        for i in reversed(range(len(chans))):
            ch = chans[i]
            self.norms.append(AdaptiveGroupNorm(c, codebook_bits, num_groups, dtype=dtype, rngs=rngs))
            self.levels.append(nnx.List([
                ResBlock(c if j == 0 else ch, ch, groups=num_groups, temporal_kernel=temporal_kernel, **common)
                for j in range(blocks[i])]))
            c = ch
            if i > 0:
                # A level without residual blocks gets its channel count from the upsampler.
                out = chans[i - 1] if blocks[i - 1] == 0 else c
                st = 2 if temporal_downsample[i - 1] else 1
                self.upsamplers.append(DepthToSpaceUpsample(c, out, st, temporal_kernel=temporal_kernel,
                                                            **common))
                c = out
        self.norm_out = GroupNorm(c, num_groups)
        self.conv_out = Conv3d(c, 3, kernel, out_axis=None, **common)

    def __call__(self, zq: jax.Array) -> jax.Array:
        """Quantized latents [B, t, h, w, bits] -> video f32 [B, T, H, W, 3] (about [-1, 1])."""
        zq = constrain_video(zq.astype(self.dtype))
        h = self.conv_in(zq)
        h = self.mid_norm(h, zq)
        for block in self.mid:
            h = block(h)
        for k, (norm, blocks) in enumerate(zip(self.norms, self.levels)):
            h = norm(h, zq)
            for block in blocks:
                h = block(h)
            if k < len(self.upsamplers):
                h = self.upsamplers[k](h)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)


class MagvitTokenizer(nnx.Module):
    """Encoder + LFQ + decoder. ``__call__`` returns the reconstruction and what the losses need."""

    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int], num_res_blocks,
                 temporal_downsample: Sequence[bool], codebook_bits: int, num_groups: int = 32,
                 temporal_kernel: int = 3, conv_impl: str = "fold_time", dtype: str = "float32",
                 rngs: nnx.Rngs):
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError(f"temporal_downsample needs one entry per downsampler "
                             f"({len(channel_multipliers) - 1}), got {tuple(temporal_downsample)}")
        if temporal_kernel < 1 or (temporal_kernel == 1 and any(temporal_downsample)):
            raise ValueError("temporal_kernel must be >= 1, and > 1 when time is downsampled")
        if base_channels < 1 or not channel_multipliers:
            raise ValueError("base_channels must be >= 1 and channel_multipliers non-empty")
        res_blocks_per_level(num_res_blocks, len(channel_multipliers))
        lfq._check_bits(codebook_bits)
        self.codebook_bits = codebook_bits
        self.temporal_downsample = tuple(bool(d) for d in temporal_downsample)
        kwargs = dict(base_channels=base_channels, channel_multipliers=tuple(channel_multipliers),
                      num_res_blocks=num_res_blocks, temporal_downsample=self.temporal_downsample,
                      codebook_bits=codebook_bits, num_groups=num_groups, temporal_kernel=temporal_kernel,
                      conv_impl=conv_impl, dtype=compute_dtype(dtype), rngs=rngs)
        self.encoder = Encoder(**kwargs)
        self.decoder = Decoder(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 2 ** self.codebook_bits

    def _check_input(self, video: jax.Array) -> None:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected a video batch [B, T, H, W, 3], got shape {video.shape}")
        check_video_shape(video.shape[1], video.shape[2], video.shape[3], self.temporal_downsample)

    def encode(self, video: jax.Array) -> jax.Array:
        """[B, T, H, W, 3] in [-1, 1] -> pre-quantization latents f32 [B, t, h, w, bits]."""
        self._check_input(video)
        return self.encoder(video)

    def tokenize(self, video: jax.Array) -> jax.Array:
        """[B, T, H, W, 3] in [-1, 1] -> int32 tokens [B, t, h, w]."""
        return lfq.quantize(self.encode(video))[1]

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """int tokens [B, t, h, w] -> video f32 [B, T, H, W, 3]."""
        return self.decoder(lfq.indices_to_codes(tokens, self.codebook_bits))

    def __call__(self, video: jax.Array) -> tuple[jax.Array, dict]:
        """Reconstruction f32 [B, T, H, W, 3] and {'z': pre-quant latents, 'tokens': int32}."""
        z = self.encode(video)
        zq, tokens = lfq.quantize(z)
        return self.decoder(zq), {"z": z, "tokens": tokens}


# The initialiser runs once: compiling it without LLVM optimisations takes seconds instead of a
# minute (one random-number program per parameter shape) and does not change its values.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def create(constructor, *, mesh=None, rules=()):
    """Runs an NNX constructor as one compiled initialiser; with ``mesh`` every variable is created
    directly in the sharding its logical axis names and ``rules`` give."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(constructor))
        init = lambda: nnx.split(constructor())[1]
        if mesh is None:
            state = jax.jit(init).lower().compile(_INIT_COMPILER_OPTIONS)()
        else:
            shardings = parallel.state_shardings(abstract, mesh, rules)
            with parallel.use_mesh(mesh, rules):
                state = jax.jit(init, out_shardings=shardings).lower().compile(_INIT_COMPILER_OPTIONS)()
    return nnx.merge(graphdef, state)


def tokenizer_from_config(model_config, rngs: nnx.Rngs) -> MagvitTokenizer:
    """Builds the tokenizer from ``config.model`` (the keys are MagvitTokenizer's arguments)."""
    return MagvitTokenizer(
        base_channels=model_config.base_channels,
        channel_multipliers=tuple(model_config.channel_multipliers),
        num_res_blocks=(model_config.num_res_blocks if isinstance(model_config.num_res_blocks, int)
                        else tuple(model_config.num_res_blocks)),
        temporal_downsample=tuple(model_config.temporal_downsample),
        codebook_bits=model_config.codebook_bits,
        num_groups=model_config.num_groups,
        temporal_kernel=model_config.temporal_kernel,
        conv_impl=model_config.conv_impl,
        dtype=model_config.dtype,
        rngs=rngs)
