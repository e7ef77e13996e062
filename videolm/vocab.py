"""The unified token space of the language model.

One id space holds every modality, in this order::

    [0, 256)                       special tokens (<pad>, <bos>, <task_*>, <bov_i>, <res_*>, ...)
    [256, 256 + T)                 text pieces (the sentencepiece model's ids, shifted)
    [.., .. + 2**video_bits)       video codes (MAGVIT-v2 LFQ index)
    [.., .. + levels * codes)      audio codes, level by level: level l occupies codes ids
                                   starting at audio_offset + l * codes (disjoint ranges)

The layout is computed from numbers only (text vocabulary size, video codebook bits, audio
levels x codes), which come from the tokenizer configs, never from tokenizer code. It is saved
as JSON with every checkpoint and compared on load: a checkpoint trained on another layout is
refused with a message naming the fields that differ.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

NUM_SPECIAL = 256

# Modality codes returned by ``VocabLayout.modality_of`` (used for per-modality loss).
SPECIAL, TEXT, VIDEO, AUDIO = 0, 1, 2, 3
MODALITY_NAMES = ("special", "text", "video", "audio")

# One <task_*> id per output type (DESIGN.md section 4); the input modalities are told by the
# <bo*_i> markers that follow.
TASK_OUTPUT_TYPES = ("video", "image", "audio", "video_audio")

NUM_RES_TOKENS = 16  # <res_0> .. <res_15>: output resolution / aspect-ratio codes.

# Fixed ids, in order from 0; ``<text_emb>`` marks a position whose embedding is replaced by a
# projected precomputed text embedding (see videolm/text.py).
_NAMED_SPECIALS = (
    "<pad>", "<bos>", "<eos>",
    "<bot_i>", "<eot_i>", "<bov_i>", "<eov_i>", "<boa_i>", "<eoa_i>",
    "<source>",
    "<bov_o>", "<eov_o>", "<boa_o>", "<eoa_o>",
    "<text_emb>",
) + tuple(f"<task_{t}>" for t in TASK_OUTPUT_TYPES) + tuple(f"<res_{i}>" for i in range(NUM_RES_TOKENS))
SPECIAL_TOKENS: dict[str, int] = {name: i for i, name in enumerate(_NAMED_SPECIALS)}
assert len(SPECIAL_TOKENS) <= NUM_SPECIAL


class VocabMismatchError(ValueError):
    """Two vocabulary layouts (a checkpoint's and the tokenizers') do not agree."""


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Offsets and sizes of each modality in the unified id space.

    Attributes:
      text_size: number of text piece ids reserved (the sentencepiece vocabulary size).
      video_bits: LFQ bits of the video tokenizer (codebook 2**video_bits).
      audio_levels: residual-VQ levels of the audio tokenizer.
      audio_codes: codes per residual-VQ level.
    """

    text_size: int
    video_bits: int
    audio_levels: int
    audio_codes: int

    def __post_init__(self):
        for name in ("text_size", "video_bits", "audio_levels", "audio_codes"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VocabLayout.{name} must be a non-negative int, got {value!r}")
        if self.video_bits > 30:
            raise ValueError(f"VocabLayout.video_bits={self.video_bits} is too large (expected <= 30)")

    # -- ranges ---------------------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return NUM_SPECIAL

    @property
    def video_size(self) -> int:
        return 2 ** self.video_bits if self.video_bits else 0

    @property
    def video_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def audio_size(self) -> int:
        return self.audio_levels * self.audio_codes

    @property
    def audio_offset(self) -> int:
        return self.video_offset + self.video_size

    @property
    def size(self) -> int:
        """Number of ids in use."""
        return self.audio_offset + self.audio_size

    def padded_size(self, multiple: int = 128) -> int:
        """The model's vocabulary (embedding rows, logits): ``size`` rounded up to ``multiple``."""
        return -(-self.size // multiple) * multiple

    def range_of(self, modality: str) -> tuple[int, int]:
        """[start, stop) of ``'special'``, ``'text'``, ``'video'``, ``'audio'`` or ``'audio_level_L'``."""
        if modality == "special":
            return 0, NUM_SPECIAL
        if modality == "text":
            return self.text_offset, self.video_offset
        if modality == "video":
            return self.video_offset, self.audio_offset
        if modality == "audio":
            return self.audio_offset, self.size
        if modality.startswith("audio_level_"):
            level = int(modality[len("audio_level_"):])
            self._check_level(level)
            start = self.audio_offset + level * self.audio_codes
            return start, start + self.audio_codes
        raise ValueError(f"unknown modality {modality!r}; expected special, text, video, audio or audio_level_L")

    # -- ids ------------------------------------------------------------------------------------
    @staticmethod
    def special(name: str) -> int:
        """Id of a special token by name, e.g. ``special('<bos>')``."""
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return SPECIAL_TOKENS[name]

    @staticmethod
    def task(output_type: str) -> int:
        """The ``<task_*>`` id of an output type (one of ``TASK_OUTPUT_TYPES``)."""
        if output_type not in TASK_OUTPUT_TYPES:
            raise KeyError(f"unknown task output type {output_type!r}; known: {', '.join(TASK_OUTPUT_TYPES)}")
        return SPECIAL_TOKENS[f"<task_{output_type}>"]

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS["<pad>"]

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS["<bos>"]

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS["<eos>"]

    @property
    def text_embedding_id(self) -> int:
        return SPECIAL_TOKENS["<text_emb>"]

    def text_ids(self, pieces):
        """Sentencepiece ids -> unified ids."""
        pieces = np.asarray(pieces)
        self._check_range(pieces, self.text_size, "text piece")
        return pieces + self.text_offset

    def video_ids(self, codes):
        """Video codes in [0, 2**video_bits) -> unified ids."""
        codes = np.asarray(codes)
        self._check_range(codes, self.video_size, "video code")
        return codes + self.video_offset

    def audio_ids(self, codes):
        """Audio codes [levels, frames] (level by level) -> unified ids [levels, frames]."""
        codes = np.asarray(codes)
        if codes.ndim < 1 or codes.shape[0] != self.audio_levels:
            raise ValueError(f"audio codes: expected shape [{self.audio_levels}, frames], got {codes.shape}")
        self._check_range(codes, self.audio_codes, "audio code")
        levels = np.arange(self.audio_levels).reshape((-1,) + (1,) * (codes.ndim - 1))
        return codes + self.audio_offset + levels * self.audio_codes

    def to_text_pieces(self, ids):
        return self._from_range(ids, "text")

    def to_video_codes(self, ids):
        return self._from_range(ids, "video")

    def to_audio_codes(self, ids):
        """Unified audio ids [levels, frames] -> codes [levels, frames] (each level's range checked)."""
        ids = np.asarray(ids)
        if ids.ndim < 1 or ids.shape[0] != self.audio_levels:
            raise ValueError(f"audio ids: expected shape [{self.audio_levels}, frames], got {ids.shape}")
        return np.stack([self._from_range(ids[level], f"audio_level_{level}") for level in range(self.audio_levels)])

    def modality_of(self, ids, xp=np):
        """Modality code (SPECIAL, TEXT, VIDEO, AUDIO) of each id; ``xp`` is numpy or jax.numpy."""
        return ((ids >= self.text_offset).astype(xp.int32) + (ids >= self.video_offset).astype(xp.int32)
                + (ids >= self.audio_offset).astype(xp.int32))

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"text_size": int(self.text_size), "video_bits": int(self.video_bits),
                "audio_levels": int(self.audio_levels), "audio_codes": int(self.audio_codes),
                "num_special": NUM_SPECIAL, "special_tokens": dict(SPECIAL_TOKENS), "size": self.size}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VocabLayout":
        missing = [k for k in ("text_size", "video_bits", "audio_levels", "audio_codes") if k not in d]
        if missing:
            raise VocabMismatchError(f"vocabulary layout is missing fields {missing}")
        layout = cls(text_size=int(d["text_size"]), video_bits=int(d["video_bits"]),
                     audio_levels=int(d["audio_levels"]), audio_codes=int(d["audio_codes"]))
        if "special_tokens" in d and dict(d["special_tokens"]) != SPECIAL_TOKENS:
            raise VocabMismatchError("vocabulary layout was saved with different special token ids")
        return layout

    @classmethod
    def from_json(cls, text: str) -> "VocabLayout":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "VocabLayout":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary layout file {path!r} does not exist")
        with open(path) as f:
            return cls.from_json(f.read())

    def check_matches(self, other: "VocabLayout | Mapping[str, Any]", *, what: str = "checkpoint") -> None:
        """Raises VocabMismatchError naming every field where ``other`` (e.g. a checkpoint's) differs."""
        if not isinstance(other, VocabLayout):
            other = VocabLayout.from_dict(other)
        diffs = [f"{f.name}: {what} has {getattr(other, f.name)}, tokenizers give {getattr(self, f.name)}"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise VocabMismatchError(
                f"vocabulary layout of the {what} does not match the tokenizers' ({'; '.join(diffs)}); "
                "the token ids would mean different things")

    # -- helpers --------------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.audio_levels:
            raise ValueError(f"audio level {level} out of range [0, {self.audio_levels})")

    @staticmethod
    def _check_range(values: np.ndarray, size: int, what: str) -> None:
        if values.size and (values.min() < 0 or values.max() >= size):
            raise ValueError(f"{what}s must lie in [0, {size}), got range [{values.min()}, {values.max()}]")

    def _from_range(self, ids, modality: str):
        ids = np.asarray(ids)
        start, stop = self.range_of(modality)
        if ids.size and (ids.min() < start or ids.max() >= stop):
            raise ValueError(f"ids are not all {modality} ids [{start}, {stop}): range [{ids.min()}, {ids.max()}]")
        return ids - start


def _lookup(config, path: str, what: str) -> int:
    node = config
    for key in path.split("."):
        if not hasattr(node, "keys") or key not in node:
            raise ValueError(f"{what}: the tokenizer config has no {path!r}")
        node = node[key]
    return int(node)


# Where the numbers live in configs/tokenizer_video.py and configs/tokenizer_audio.py.
VIDEO_BITS_KEY = "model.codebook_bits"
AUDIO_LEVELS_KEY = "model.num_levels"
AUDIO_CODES_KEY = "model.codebook_size"


def layout_from_configs(text_size: int, video_config=None, audio_config=None, *, video_bits: int | None = None,
                        audio_levels: int | None = None, audio_codes: int | None = None) -> VocabLayout:
    """The layout from the tokenizer configs (their numbers, not their code).

    Each number is read from the tokenizer config when one is given, else taken from the explicit
    argument.
    """
    if video_config is not None:
        video_bits = _lookup(video_config, VIDEO_BITS_KEY, "video codebook bits")
    if audio_config is not None:
        audio_levels = _lookup(audio_config, AUDIO_LEVELS_KEY, "audio RVQ levels")
        audio_codes = _lookup(audio_config, AUDIO_CODES_KEY, "audio codes per level")
    for name, value in (("video_bits", video_bits), ("audio_levels", audio_levels), ("audio_codes", audio_codes)):
        if value is None:
            raise ValueError(f"vocabulary layout: {name} needs a tokenizer config or an explicit value")
    return VocabLayout(text_size=int(text_size), video_bits=video_bits, audio_levels=audio_levels,
                       audio_codes=audio_codes)
