"""Using a trained video tokenizer: ``VideoTokenizer.from_workdir(DIR)``.

    tok = VideoTokenizer.from_workdir("runs/tokenizer")
    tokens = tok.encode(video)        # uint8 [17, 64, 64, 3] -> int32 [5, 16, 16]
    tokens = tok.encode(image)        # uint8 [64, 64, 3]     -> int32 [1, 16, 16]
    video = tok.decode(tokens)        # int32 [5, 16, 16]     -> uint8 [17, 64, 64, 3]
    tok.token_shape(17, 64, 64)       # (5, 16, 16), from the config alone
    tok.vocab_size                    # 2 ** codebook_bits

Inputs are uint8 RGB or float in [-1, 1]; ``encode_batch`` / ``decode_batch`` take a leading batch
axis. Clips must have 1 + s * k frames (s = the total temporal downsampling, 4 in VideoPoet) and
sides divisible by the spatial downsampling.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tokenizers.magvit import model as model_lib
from videolm import checkpoint

CONFIG_FILE = "config.json"


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved in its workdir."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a video-tokenizer run directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_tokenizer_params(workdir: str, *, use_ema: bool = True, step: int | None = None,
                          config: ml_collections.ConfigDict | None = None):
    """(config, Param state of the tokenizer) from the latest (or ``step``) checkpoint of a run."""
    from tokenizers.magvit.train import TrainModels
    config = config if config is not None else load_run_config(workdir)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainModels(config, nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    with checkpoint.Checkpointer(workdir) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train the tokenizer first")
        state, _ = ckpt.restore(abstract, step=step)
    models = nnx.merge(graphdef, state)
    return config, nnx.state(models.ema if use_ema else models.tokenizer, nnx.Param)


# Module-level programs keyed by the (hashable) graph definition: every tokenizer of the same
# architecture in a process shares one compiled encoder and decoder per input shape.
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokenize(graphdef, state, video):
    return nnx.merge(graphdef, state).tokenize(video)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_tokens(graphdef, state, tokens):
    return nnx.merge(graphdef, state).decode_tokens(tokens)


class VideoTokenizer:
    """Encode videos/images to LFQ tokens and decode tokens to videos."""

    def __init__(self, model_config, params: nnx.State | None = None, *, seed: int = 0):
        self.model_config = model_config
        tokenizer = model_lib.create(lambda: model_lib.tokenizer_from_config(model_config, nnx.Rngs(seed)))
        if params is not None:
            nnx.update(tokenizer, params)
        self._graphdef, self._state = nnx.split(tokenizer)
        self.codebook_bits = tokenizer.codebook_bits
        self.temporal_downsample = tokenizer.temporal_downsample

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, step: int | None = None) -> "VideoTokenizer":
        config, params = load_tokenizer_params(workdir, use_ema=use_ema, step=step)
        return cls(config.model, params)

    @property
    def vocab_size(self) -> int:
        return 2 ** self.codebook_bits

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def token_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return model_lib.token_shape(num_frames, height, width, self.temporal_downsample)

    def num_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` token frames."""
        return 1 + (latent_frames - 1) * self.time_factor

    @staticmethod
    def _to_float(video) -> jax.Array:
        video = np.asarray(video)
        if video.dtype == np.uint8:
            return jnp.asarray(video, jnp.float32) / 127.5 - 1.0
        if not np.issubdtype(video.dtype, np.floating):
            raise ValueError(f"video must be uint8 or float in [-1, 1], got dtype {video.dtype}")
        if video.size and np.abs(video).max() > 1.0 + 1e-3:
            raise ValueError("float video must lie in [-1, 1] (pass uint8 for 0..255 pixels)")
        return jnp.asarray(video, jnp.float32)

    def encode_batch(self, videos) -> np.ndarray:
        """[B, T, H, W, 3] (or images [B, H, W, 3]) -> int32 tokens [B, t, h, w]."""
        videos = self._to_float(videos)
        if videos.ndim == 4:
            videos = videos[:, None]
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"expected videos [B, T, H, W, 3] or images [B, H, W, 3], got {videos.shape}")
        model_lib.check_video_shape(*videos.shape[1:4], self.temporal_downsample)
        return np.asarray(_tokenize(self._graphdef, self._state, videos))

    def encode(self, video_or_image) -> np.ndarray:
        """[T, H, W, 3] video or [H, W, 3] image -> int32 tokens [t, h, w] (t = 1 for an image)."""
        x = np.asarray(video_or_image)
        if x.ndim not in (3, 4) or x.shape[-1] != 3:
            raise ValueError(f"expected a video [T, H, W, 3] or an image [H, W, 3], got shape {x.shape}")
        return self.encode_batch(x[None])[0]

    def decode_batch(self, tokens, *, as_float: bool = False) -> np.ndarray:
        """int tokens [B, t, h, w] -> uint8 videos [B, T, H, W, 3] (f32 in [-1, 1] if as_float)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 4 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"expected integer tokens [B, t, h, w], got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        video = jnp.clip(_decode_tokens(self._graphdef, self._state, jnp.asarray(tokens, jnp.int32)), -1.0, 1.0)
        if as_float:
            return np.asarray(video)
        return np.asarray(jnp.round((video + 1.0) * 127.5)).astype(np.uint8)

    def decode(self, tokens, *, as_float: bool = False) -> np.ndarray:
        """int tokens [t, h, w] -> uint8 video [T, H, W, 3] with T = 1 + s * (t - 1)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens [t, h, w], got shape {tokens.shape}")
        return self.decode_batch(tokens[None], as_float=as_float)[0]
