"""Text conditioning: sentencepiece pieces (the default) or projected precomputed embeddings.

Pieces. ``train_sentencepiece`` learns a small model from the dataset's captions (in memory, no
files needed), or ``TextTokenizer.load`` reads a user's ``.model``; the LM embeds the pieces like
any other token (ids shifted by ``VocabLayout.text_offset``).

Precomputed embeddings (what the paper does with a frozen T5-XL): the caller brings float
embeddings [num_text, dim] from any text encoder it ran itself (nothing is fetched here). The
sequence holds up to ``MAX_TEXT_POSITIONS`` ``<text_emb>`` placeholder ids after ``<bot_i>``;
``TextEmbeddingProjection`` maps the embeddings through one linear layer and writes the k-th
projected embedding at the k-th placeholder of each row.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx

from videolm.vocab import VocabLayout

MAX_TEXT_POSITIONS = 64


class TextTokenizer:
    """A sentencepiece model: caption <-> piece ids in [0, vocab_size)."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model {path!r} does not exist")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except RuntimeError as e:
            raise ValueError(f"{path!r} is not a sentencepiece model: {e}") from None

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, pieces: Sequence[int]) -> str:
        return self._sp.decode([int(p) for p in pieces])


def train_sentencepiece(captions: Iterable[str], vocab_size: int, *, model_type: str = "unigram") -> TextTokenizer:
    """Learns a sentencepiece model from captions, in memory.

    ``vocab_size`` is an upper bound: a small caption grammar may support fewer pieces, and the
    model then has fewer (``hard_vocab_limit=False``). Id 0 is ``<unk>``; no bos/eos/pad pieces
    (the LM vocabulary has its own special tokens).
    """
    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("train_sentencepiece: no non-empty captions to learn from")
    if vocab_size < 4:
        raise ValueError(f"train_sentencepiece: vocab_size must be >= 4, got {vocab_size}")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
        hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        minloglevel=2)
    return TextTokenizer(writer.getvalue())


def encode_caption(tokenizer: TextTokenizer, layout: VocabLayout, caption: str, max_len: int) -> np.ndarray:
    """Caption -> unified text ids (at most ``max_len``, truncated)."""
    if tokenizer.vocab_size > layout.text_size:
        raise ValueError(f"sentencepiece model has {tokenizer.vocab_size} pieces but the vocabulary layout "
                         f"reserves text_size={layout.text_size}")
    return layout.text_ids(np.asarray(tokenizer.encode(caption)[:max_len], np.int64)).astype(np.int32)


def embedding_placeholders(num_text: int) -> np.ndarray:
    """The ``<text_emb>`` ids that reserve ``num_text`` positions for projected embeddings."""
    if not 0 < num_text <= MAX_TEXT_POSITIONS:
        raise ValueError(f"num_text must be in [1, {MAX_TEXT_POSITIONS}], got {num_text}")
    return np.full((num_text,), VocabLayout.special("<text_emb>"), np.int32)


class TextEmbeddingProjection(nnx.Module):
    """One linear layer from precomputed text embeddings [B, N, text_dim] into the LM width."""

    def __init__(self, text_dim: int, width: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(text_dim ** -0.5)
        self.kernel = nnx.Param(init(rngs.params(), (text_dim, width), param_dtype),
                                out_sharding=("text_embed", "embed"), eager_sharding=False)
        self.text_dim = text_dim

    def __call__(self, x, tokens, text_embeddings, placeholder_id: int):
        """Writes projected embeddings at the placeholder positions of ``x`` [B, S, width].

        The k-th placeholder of row b receives ``text_embeddings[b, k]``; a row may use fewer
        placeholders than N, but not more.
        """
        b, n, dim = text_embeddings.shape
        if dim != self.text_dim or b != x.shape[0]:
            raise ValueError(f"text_embeddings must be [batch={x.shape[0]}, num_text, {self.text_dim}], "
                             f"got {text_embeddings.shape}")
        if n > MAX_TEXT_POSITIONS:
            raise ValueError(f"text_embeddings has {n} positions; at most {MAX_TEXT_POSITIONS} are reserved")
        projected = jnp.einsum("bnt,td->bnd", text_embeddings.astype(x.dtype), self.kernel[...].astype(x.dtype))
        is_slot = tokens == placeholder_id
        slot = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, n - 1)
        gathered = jnp.take_along_axis(projected, slot[..., None], axis=1)
        return jnp.where(is_slot[..., None], gathered, x)
