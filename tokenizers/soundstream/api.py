"""The trained audio tokenizer as the rest of videolm uses it.

    tok = AudioTokenizer.from_workdir(workdir)           # the run's config.json + latest checkpoint
    codes = tok.encode(waveform)                         # float [S] -> int32 [levels, S // hop]
    audio = tok.decode(codes)                            # -> float32 [frames * hop]
    coarse = tok.decode(codes[:2])                       # decode from the first 2 levels only
    ids = tok.flatten(codes)                             # LM ids: level by level, disjoint ranges

Batched inputs work too: ``[B, S] -> [B, levels, frames]`` and back.
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

from tokenizers.soundstream import rvq
from tokenizers.soundstream.model import SoundStream
from videolm import checkpoint


def restore_codec(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> SoundStream:
    """The codec (parameters and RVQ state) of the checkpoint ``step`` (default latest) in ``workdir``."""
    from tokenizers.soundstream.train import TrainState   # the checkpoint holds the whole TrainState

    abstract = nnx.eval_shape(lambda: TrainState(config, nnx.Rngs(config.seed)))
    graphdef, state = nnx.split(abstract)
    pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                        nnx.to_pure_dict(state))
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        restored, _ = ckpt.restore(pure, step=step)
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state).codec


class AudioTokenizer:
    """Waveforms <-> SoundStream codes ``[levels, frames]`` with a fixed hop."""

    def __init__(self, codec: SoundStream, sample_rate: int):
        self.codec = codec
        self.sample_rate = int(sample_rate)
        self.hop = codec.hop
        self.num_levels = codec.quantizer.num_levels
        self.codebook_size = codec.quantizer.codebook_size
        self._graphdef, self._state = nnx.split(codec)

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> "AudioTokenizer":
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: expected the config.json an audio tokenizer "
                                    f"training run writes into its workdir")
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        if config.get("kind") != "audio_tokenizer":
            raise ValueError(f"{path}: kind is {config.get('kind')!r}, expected 'audio_tokenizer'")
        return cls.from_config(config, workdir, step)

    @classmethod
    def from_config(cls, config, workdir: str, step: int | None = None) -> "AudioTokenizer":
        return cls(restore_codec(config, workdir, step), config.data.world.sample_rate)

    # ------------------------------------------------------------------ shapes

    def num_frames(self, num_samples: int) -> int:
        """Latent frames for a clip of ``num_samples`` samples (34,000 at hop 320 -> 106)."""
        return int(num_samples) // self.hop

    def num_samples(self, num_frames: int) -> int:
        return int(num_frames) * self.hop

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def vocab_size(self) -> int:
        """Distinct flattened ids: ``num_levels * codebook_size``."""
        return self.num_levels * self.codebook_size

    # ------------------------------------------------------------------ encode / decode

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _encode(self, state, waveform, num_levels):
        return nnx.merge(self._graphdef, state).encode(waveform, num_levels)

    @functools.partial(jax.jit, static_argnums=0)
    def _decode(self, state, codes):
        return nnx.merge(self._graphdef, state).decode(codes)

    def encode(self, waveform, num_levels: int | None = None) -> np.ndarray:
        """float ``[S]`` -> int32 ``[levels, S // hop]`` (or ``[B, S]`` -> ``[B, levels, frames]``)."""
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim not in (1, 2):
            raise ValueError(f"encode: expected a waveform [samples] or [batch, samples], got {waveform.shape}")
        if waveform.shape[-1] < self.hop:
            raise ValueError(f"encode: {waveform.shape[-1]} samples is shorter than one hop ({self.hop})")
        batch = waveform if waveform.ndim == 2 else waveform[None]
        codes = self._encode(self._state, jnp.asarray(batch), num_levels)      # [B, T, L]
        codes = np.asarray(codes, np.int32).transpose(0, 2, 1)
        return codes if waveform.ndim == 2 else codes[0]

    def decode(self, codes) -> np.ndarray:
        """int ``[n, frames]`` codes of the first ``n <= levels`` levels -> float32 ``[frames * hop]``
        (or ``[B, n, frames]`` -> ``[B, frames * hop]``)."""
        codes = np.asarray(codes)
        if codes.ndim not in (2, 3) or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"decode: expected integer codes [levels, frames] or [batch, levels, frames], "
                             f"got {codes.dtype} {codes.shape}")
        batch = codes if codes.ndim == 3 else codes[None]
        if not 1 <= batch.shape[1] <= self.num_levels:
            raise ValueError(f"decode: {batch.shape[1]} levels given; expected 1 to {self.num_levels}")
        if batch.size and (batch.min() < 0 or batch.max() >= self.codebook_size):
            raise ValueError(f"decode: codes must lie in [0, {self.codebook_size}), got "
                             f"[{batch.min()}, {batch.max()}]")
        audio = np.asarray(self._decode(self._state, jnp.asarray(batch.transpose(0, 2, 1), jnp.int32)))
        return audio if codes.ndim == 3 else audio[0]

    # ------------------------------------------------------------------ LM ids

    def flatten(self, codes) -> np.ndarray:
        """``[..., levels, frames]`` -> ``[..., levels * frames]`` ids in ``[0, vocab_size)``."""
        return rvq.flatten_codes(np.asarray(codes), self.codebook_size)

    def unflatten(self, ids) -> np.ndarray:
        return rvq.unflatten_codes(np.asarray(ids), self.num_levels, self.codebook_size)

