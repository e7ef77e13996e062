"""Sampling from the prefix LM: KV-cache decoding, constraints, guidance, long video.

    layout = TargetLayout("video", video_shape=(5, 16, 16))           # what the target looks like
    tokens = generate(model, [prefix_a, prefix_b], num_tokens=layout.length, vocab=vocab,
                      allowed=layout, sampling=SamplingConfig(temperature=1.0, top_k=64, seed=3),
                      uncond_prefixes=[uncond_a, uncond_b])              # int32 [2, num_tokens]
    parts = layout.split(vocab, tokens[0])                              # {'video': codes [5, 16, 16]}

``generate`` decodes a batch of prompts under one ``jax.jit``: the (left-padded) prefixes in one
bidirectional pass that fills a fixed-size KV cache (``videolm.model.decode``), then one token per
step in a ``lax.scan``. Each step applies, in this order: classifier-free guidance
(``cond + (scale - 1) * (cond - uncond)``, i.e. ``uncond + scale * (cond - uncond)``, with both
branches batched in one forward), the per-position constraint, temperature, top-k, top-p, and
draws from the result (argmax when ``temperature == 0``); ``forced`` tokens replace the draw.
Row b's draw at step n uses the key ``fold_in(row_key[b], n)``, so a sample is reproduced by its
seed whatever else is in the batch (give ``seed`` as one int per prompt for that).

VideoPoet's target layouts are known before decoding (``videolm/tasks.py``): ``TargetLayout``
turns one into a per-position allowed id range (``Constraint``), so a video position can only be
a video code and ``<eov_o>`` comes exactly where the layout puts it.

``extend_video`` makes long videos the paper's way: condition on the tokens of the last second of
the clip so far (the future-prediction task's prefix), generate the next clip, repeat.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from videolm import tasks
from videolm.model import decode
from videolm.vocab import VocabLayout

# ----------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each token is drawn.

    Attributes:
      temperature: logits are divided by it; 0 means greedy (argmax).
      top_k: keep the k most likely allowed ids (0: all). Ids tied with the k-th are kept too.
      top_p: keep the smallest set of most likely ids whose probability reaches top_p (1: all).
      guidance_scale: classifier-free guidance scale (1: the conditional model alone).
      seed: one int for the batch (row b uses ``fold_in(key(seed), b)``), or one int per prompt.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    seed: int | tuple[int, ...] = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.guidance_scale):
            raise ValueError(f"SamplingConfig.guidance_scale must be finite, got {self.guidance_scale}")

    def row_keys(self, batch_size: int) -> jax.Array:
        """One PRNG key per prompt."""
        if isinstance(self.seed, (int, np.integer)):
            base = jax.random.key(int(self.seed))
            return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch_size))
        seeds = tuple(int(s) for s in self.seed)
        if len(seeds) != batch_size:
            raise ValueError(f"SamplingConfig.seed has {len(seeds)} seeds for {batch_size} prompts")
        return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


# ----------------------------------------------------------------------------------- constraints


class Constraint(NamedTuple):
    """Per-position allowed ids: position n may emit ids in ``[lo[n], hi[n])``."""

    lo: np.ndarray  # int32 [N]
    hi: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return int(self.lo.shape[0])

    def allows(self, tokens) -> np.ndarray:
        """bool, same shape as ``tokens`` [..., N]: whether each token is allowed at its position."""
        tokens = np.asarray(tokens)
        return (tokens >= self.lo) & (tokens < self.hi)

    def mask(self, vocab_size: int) -> np.ndarray:
        """The same constraint as a boolean [N, vocab_size] mask."""
        ids = np.arange(vocab_size)[None]
        return (ids >= self.lo[:, None]) & (ids < self.hi[:, None])


OUTPUT_TYPES = tasks.OUTPUT_TYPES


@dataclasses.dataclass(frozen=True)
class TargetLayout:
    """The target of a task, as ``videolm/tasks.py`` writes it.

    ``video``: ``<bov_o> video <eov_o> <eos>``; ``image``: ``<bov_o> image`` (no close, so an
    image can be continued into a video); ``audio``: ``<boa_o> level 1 .. level L <eoa_o> <eos>``;
    ``video_audio``: ``<bov_o> video <eov_o> <boa_o> audio <eoa_o> <eos>``.

    Attributes:
      output: one of ``OUTPUT_TYPES``.
      video_shape: latent video shape [t, h, w] (an image is [1, h, w]).
      audio_shape: audio tokens [levels, frames] (predicted level by level).
    """

    output: str
    video_shape: tuple[int, int, int] | None = None
    audio_shape: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("video_shape", "audio_shape"):  # plain int tuples (hashable, comparable)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"TargetLayout.output {self.output!r}: expected one of {OUTPUT_TYPES}")
        if self.output != "audio":
            if self.video_shape is None or len(self.video_shape) != 3 or min(self.video_shape) < 1:
                raise ValueError(f"TargetLayout({self.output!r}) needs video_shape [t, h, w], got {self.video_shape}")
            if self.output == "image" and self.video_shape[0] != 1:
                raise ValueError(f"an image target has one latent frame, got video_shape {self.video_shape}")
        if "audio" in self.output:
            if self.audio_shape is None or len(self.audio_shape) != 2 or min(self.audio_shape) < 1:
                raise ValueError(f"TargetLayout({self.output!r}) needs audio_shape [levels, frames], "
                                 f"got {self.audio_shape}")

    def segments(self, vocab: VocabLayout) -> list[tuple[str, int, int, int]]:
        """(name, count, lo, hi) blocks in order: ``count`` positions allowed ids in [lo, hi)."""
        def special(name):
            i = VocabLayout.special(name)
            return (name, 1, i, i + 1)
        out = []
        if self.output != "audio":
            t, h, w = self.video_shape
            out += [special("<bov_o>"), ("video", t * h * w, *vocab.range_of("video"))]
            if self.output != "image":
                out.append(special("<eov_o>"))
        if "audio" in self.output:
            levels, frames = self.audio_shape
            if levels != vocab.audio_levels:
                raise ValueError(f"audio_shape has {levels} levels, the vocabulary {vocab.audio_levels}")
            out.append(special("<boa_o>"))
            out += [(f"audio_level_{l}", frames, *vocab.range_of(f"audio_level_{l}")) for l in range(levels)]
            out.append(special("<eoa_o>"))
        if self.output != "image":
            out.append(special("<eos>"))
        return out

    @property
    def length(self) -> int:
        n = 0
        if self.output != "audio":
            n += 1 + int(np.prod(self.video_shape)) + (self.output != "image")
        if "audio" in self.output:
            n += 2 + int(np.prod(self.audio_shape))
        return n + (self.output != "image")

    def constraint(self, vocab: VocabLayout) -> Constraint:
        segs = self.segments(vocab)
        lo = np.concatenate([np.full(c, l, np.int32) for _, c, l, _ in segs])
        hi = np.concatenate([np.full(c, h, np.int32) for _, c, _, h in segs])
        return Constraint(lo, hi)

    def forced(self, vocab: VocabLayout, *, video=None, audio=None) -> np.ndarray:
        """int32 [length]: the known leading part of a target, -1 elsewhere (``generate(forced=)``).

        ``video``: codes [k, h, w] of the first k latent frames (continuations: the context
        frames that the target repeats); ``audio``: codes [levels, f] of each level's first f
        frames. Every special token of the layout is forced too.
        """
        out = np.full(self.length, -1, np.int32)
        start = 0
        for name, count, lo, hi in self.segments(vocab):
            if count == 1 and hi == lo + 1:
                out[start] = lo
            elif name == "video" and video is not None:
                video = np.asarray(video)
                t, h, w = self.video_shape
                if video.ndim != 3 or video.shape[1:] != (h, w) or video.shape[0] > t:
                    raise ValueError(f"forced video: expected codes [k <= {t}, {h}, {w}], got {video.shape}")
                out[start:start + video.size] = vocab.video_ids(video.reshape(-1))
            elif name.startswith("audio_level_") and audio is not None:
                audio = np.asarray(audio)
                level = int(name[len("audio_level_"):])
                if audio.ndim != 2 or audio.shape[0] != self.audio_shape[0] or audio.shape[1] > self.audio_shape[1]:
                    raise ValueError(f"forced audio: expected codes [{self.audio_shape[0]}, f <= "
                                     f"{self.audio_shape[1]}], got {audio.shape}")
                out[start:start + audio.shape[1]] = vocab.audio_ids(audio)[level]
            start += count
        return out

    def split(self, vocab: VocabLayout, tokens) -> dict:
        """Generated target ids [length] -> tokenizer codes: ``video`` [t, h, w], ``audio`` [L, f]."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.length,):
            raise ValueError(f"target tokens: expected shape ({self.length},), got {tokens.shape}")
        out, start = {}, 0
        for name, count, lo, hi in self.segments(vocab):
            piece = tokens[start:start + count]
            if piece.size and (piece.min() < lo or piece.max() >= hi):
                raise ValueError(f"target positions {start}..{start + count - 1} ({name}) hold ids outside "
                                 f"[{lo}, {hi})")
            if name == "video":
                out["video"] = vocab.to_video_codes(piece).reshape(self.video_shape)
            elif name.startswith("audio_level_"):
                out.setdefault("audio", []).append(piece)
            start += count
        if "audio" in out:
            out["audio"] = vocab.to_audio_codes(np.stack(out["audio"]))
        return out


def target_layout(task_name: str, *, video_shape=None, audio_shape=None) -> TargetLayout:
    """The target layout of a registered task (``tasks.TASKS``); images take ``video_shape[1:]``."""
    output = tasks.get_task(task_name).output
    if output == "image" and video_shape is not None:
        video_shape = (1, *tuple(video_shape)[-2:])
    return TargetLayout(output, video_shape=None if output == "audio" else tuple(video_shape or ()) or None,
                        audio_shape=tuple(audio_shape) if audio_shape is not None and "audio" in output else None)


# ----------------------------------------------------------------------------------- token choice


def _top_k(logits, k):
    """Keeps ids whose logit is at least the k-th largest of their row (k may be traced)."""
    ordered = -jnp.sort(-logits, axis=-1)
    kth = jax.lax.dynamic_index_in_dim(ordered, jnp.clip(k - 1, 0, logits.shape[-1] - 1), axis=-1)
    return jnp.where(logits >= kth, logits, -jnp.inf)


def _top_p(logits, p):
    """Keeps the smallest set of most likely ids whose probability reaches p (never empty)."""
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < p  # the mass of the strictly more likely ids < p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def filter_logits(logits, allowed, *, temperature, top_k=0, top_p=1.0):
    """Logits [B, V] restricted to ``allowed`` [B, V], divided by ``temperature`` (> 0), then top-k
    (0: off), then top-p (1: off). Excluded ids get ``-inf`` (probability exactly 0).

    Every setting may be a traced scalar: one compiled program serves every sampling setting.
    """
    logits = jnp.where(allowed, logits.astype(jnp.float32) / temperature, -jnp.inf)
    logits = jax.lax.cond(top_k > 0, _top_k, lambda l, k: l, logits, top_k)
    return jax.lax.cond(top_p < 1.0, _top_p, lambda l, p: l, logits, top_p)


class _Statics(NamedTuple):
    """The compile-time settings of one decode program (the sampling settings are traced)."""

    num_tokens: int
    guided: bool
    has_mask: bool
    layer_loop: str = "scan"


def _choose(logits, n, ctl, statics: _Statics):
    """The token of every prompt at target position n from the model's logits [rows, V]."""
    if statics.guided:
        cond, uncond = jnp.split(logits, 2, axis=0)
        logits = cond + (ctl["guidance_scale"] - 1.0) * (cond - uncond)
    ids = jnp.arange(logits.shape[-1])
    allowed = (ids >= ctl["lo"][n]) & (ids < ctl["hi"][n])
    if statics.has_mask:
        allowed = allowed & ctl["mask"][n]
    allowed = jnp.broadcast_to(allowed, logits.shape)

    def greedy(logits):
        return jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(jnp.int32)

    def draw(logits):
        filtered = filter_logits(logits, allowed, temperature=ctl["temperature"], top_k=ctl["top_k"],
                                 top_p=ctl["top_p"])
        keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(ctl["keys"])
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    token = jax.lax.cond(ctl["temperature"] > 0, draw, greedy, logits)
    forced = ctl["forced"][:, n]
    return jnp.where(forced >= 0, forced, token)


@functools.partial(jax.jit, static_argnames=("graphdef", "statics"))
def _generate_cached(graphdef, state, tokens, pad_len, ctl, text_embeddings, *, statics):
    model = nnx.merge(graphdef, state)
    num_tokens, guided = statics.num_tokens, statics.guided
    rows, prefix_slots = tokens.shape
    # Unrolled layers: each layer's weights sliced once here, outside the token loop.
    layers = decode.unstack_layers(model) if statics.layer_loop == "unrolled" else None
    cache = decode.init_cache(model, rows, prefix_slots + num_tokens - 1, per_layer=layers is not None)
    logits, cache = decode.prefill(model, tokens, pad_len, cache, text_embeddings=text_embeddings)
    first = _choose(logits, 0, ctl, statics)

    def body(carry, n):
        cache, token = carry
        feed = jnp.concatenate([token, token]) if guided else token
        logits, cache = decode.step(model, feed, prefix_slots + n - 1, pad_len, cache, layers)
        token = _choose(logits, n, ctl, statics)
        return (cache, token), token

    _, rest = jax.lax.scan(body, (cache, first), jnp.arange(1, num_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "statics"))
def _generate_uncached(graphdef, state, tokens, pad_len, ctl, text_embeddings, *, statics):
    """Reference: the full forward of the whole sequence at every step (no cache)."""
    model = nnx.merge(graphdef, state)
    num_tokens, guided = statics.num_tokens, statics.guided
    rows, prefix_slots = tokens.shape
    slots = jnp.arange(prefix_slots + num_tokens)[None]
    positions = jnp.maximum(slots - pad_len[:, None], 0)
    segment_ids = (slots >= pad_len[:, None]).astype(jnp.int32)
    prefix_len = jnp.full((rows,), prefix_slots, jnp.int32)
    buffer = jnp.concatenate([tokens, jnp.zeros((rows, num_tokens), tokens.dtype)], axis=1)

    def body(buffer, n):
        # Later slots hold placeholders; causal attention keeps them out of slot P + n - 1.
        hidden = model.hidden(buffer, prefix_len=prefix_len, segment_ids=segment_ids, positions=positions,
                              text_embeddings=text_embeddings)
        last = jax.lax.dynamic_slice_in_dim(hidden, prefix_slots + n - 1, 1, axis=1)
        token = _choose(model.logits(last)[:, 0], n, ctl, statics)
        feed = jnp.concatenate([token, token]) if guided else token
        buffer = jax.lax.dynamic_update_slice(buffer, feed[:, None], (0, prefix_slots + n))
        return buffer, token

    _, out = jax.lax.scan(body, buffer, jnp.arange(num_tokens))
    return out.T


# ----------------------------------------------------------------------------------- generate


def _as_rows(prefixes, what: str) -> list[np.ndarray]:
    if isinstance(prefixes, np.ndarray) or isinstance(prefixes, jax.Array):
        prefixes = np.asarray(prefixes)
        if prefixes.ndim != 2:
            raise ValueError(f"{what}: expected a list of 1-D id arrays or an int array [batch, len], "
                             f"got shape {prefixes.shape}")
    rows = [np.asarray(p) for p in prefixes]
    if not rows:
        raise ValueError(f"{what}: no prompts given")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"{what}[{i}]: expected a non-empty 1-D integer id array, got {row.dtype} {row.shape}")
    return rows


def left_pad(rows: Sequence[np.ndarray], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [B, length] right-aligned rows, int32 [B] padding slots of each row)."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    pad_len = np.zeros(len(rows), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - row.size:] = row
        pad_len[i] = length - row.size
    return tokens, pad_len


def _allowed_arrays(allowed, num_tokens, vocab_size, vocab):
    """(lo [N], hi [N], mask [N, V] or None) from the forms ``generate`` accepts."""
    limit = min(vocab.size, vocab_size) if vocab is not None else vocab_size
    mask = None
    if allowed is None:
        constraint = Constraint(np.zeros(num_tokens, np.int32), np.full(num_tokens, limit, np.int32))
    elif isinstance(allowed, TargetLayout):
        if vocab is None:
            raise ValueError("generate: allowed=TargetLayout needs vocab=VocabLayout")
        constraint = allowed.constraint(vocab)
    elif isinstance(allowed, Constraint):
        constraint = Constraint(np.asarray(allowed.lo, np.int32), np.asarray(allowed.hi, np.int32))
    else:
        mask = np.asarray(allowed)
        if mask.dtype != bool or mask.ndim != 2 or mask.shape[0] != num_tokens or mask.shape[1] > vocab_size:
            raise ValueError(f"generate: allowed must be a TargetLayout, a Constraint or a bool mask "
                             f"[num_tokens={num_tokens}, <= vocab {vocab_size}], got {mask.dtype} {mask.shape}")
        mask = np.pad(mask, ((0, 0), (0, vocab_size - mask.shape[1])))
        constraint = Constraint(np.zeros(num_tokens, np.int32), np.full(num_tokens, vocab_size, np.int32))
    if len(constraint) != num_tokens:
        raise ValueError(f"generate: the constraint covers {len(constraint)} positions, num_tokens={num_tokens}")
    lo, hi = np.maximum(constraint.lo, 0), np.minimum(constraint.hi, vocab_size)
    empty = (hi <= lo) if mask is None else ~(constraint.mask(vocab_size) & mask).any(axis=1)
    if empty.any():
        raise ValueError(f"generate: no id is allowed at target positions {np.flatnonzero(empty)[:8].tolist()}")
    return lo.astype(np.int32), hi.astype(np.int32), mask


def _forced_array(forced, batch, num_tokens, lo, hi, mask):
    if forced is None:
        return np.full((batch, num_tokens), -1, np.int32)
    forced = np.asarray(forced)
    if forced.ndim == 1:
        forced = np.broadcast_to(forced, (batch, forced.shape[0]))
    if forced.shape != (batch, num_tokens) or not np.issubdtype(forced.dtype, np.integer):
        raise ValueError(f"generate: forced must be int [batch={batch}, num_tokens={num_tokens}] (-1 = sample), "
                         f"got {forced.dtype} {forced.shape}")
    rows, cols = np.nonzero(forced >= 0)
    values = forced[rows, cols]
    bad = (values < lo[cols]) | (values >= hi[cols])
    if mask is not None:
        bad |= ~mask[cols, np.clip(values, 0, mask.shape[1] - 1)]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"generate: forced token {values[i]} at row {rows[i]}, position {cols[i]} "
                         "is not allowed there")
    return forced.astype(np.int32)


def generate(model, prefixes, *, num_tokens: int, allowed=None, sampling: SamplingConfig = SamplingConfig(),
             uncond_prefixes=None, vocab: VocabLayout | None = None, forced=None, use_cache: bool = True,
             layer_loop: str | None = None, text_embeddings=None, prefix_multiple: int = 1) -> np.ndarray:
    """Samples ``num_tokens`` target tokens after each prompt; returns int32 [B, num_tokens].

    Args:
      model: a ``PrefixLM``.
      prefixes: B prompts, each int [P_b] unified ids (the task prefix, ``<bos>`` .. ``<res>``),
        lengths may differ (rows are left-padded; padding is never attended).
      num_tokens: target positions to produce (``TargetLayout.length`` for a task's target).
      allowed: ``None`` (any id of ``vocab``, or of the model), a ``TargetLayout`` (needs ``vocab``),
        a ``Constraint`` (per-position id range) or a bool mask [num_tokens, vocab].
      sampling: temperature, top-k, top-p, guidance scale, seed.
      uncond_prefixes: B unconditional (or negative) prompts for classifier-free guidance; needed
        when ``sampling.guidance_scale != 1``, used whenever given.
      vocab: the ``VocabLayout`` of the model.
      forced: int [B, num_tokens] or [num_tokens]: a token >= 0 is emitted (and fed) at that
        position instead of a draw (known parts of a target, e.g. the context frames of a
        continuation); -1 leaves the position to sampling.
      use_cache: False runs the reference decoder that recomputes the whole sequence each step.
      layer_loop: ``'scan'`` over the stacked layers or ``'unrolled'`` over per-layer weights
        and caches; default ``decode.default_layer_loop()`` (unrolled on CPU).
      text_embeddings: float [rows, num_text, dim] precomputed text embeddings written at the
        ``<text_emb>`` placeholders of each prompt (rows: the B prompts, then with guidance the B
        unconditional ones), for a model with a text projection.
      prefix_multiple: the padded prompt length is rounded up to this multiple, so prompts of
        nearby lengths share one compiled program.
    """
    layer_loop = layer_loop or decode.default_layer_loop()
    if layer_loop not in ("scan", "unrolled"):
        raise ValueError(f"generate: layer_loop must be 'scan' or 'unrolled', got {layer_loop!r}")
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"generate: num_tokens must be a positive int, got {num_tokens!r}")
    rows = _as_rows(prefixes, "prefixes")
    batch = len(rows)
    guided = uncond_prefixes is not None
    if sampling.guidance_scale != 1.0 and not guided:
        raise ValueError(f"generate: guidance_scale={sampling.guidance_scale} needs uncond_prefixes")
    if guided:
        uncond = _as_rows(uncond_prefixes, "uncond_prefixes")
        if len(uncond) != batch:
            raise ValueError(f"generate: {len(uncond)} uncond_prefixes for {batch} prefixes")
        rows = rows + uncond
    vocab_size = model.vocab_size
    for i, row in enumerate(rows):
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"prompt {i}: ids must lie in [0, {vocab_size}), got [{row.min()}, {row.max()}]")
    if prefix_multiple < 1:
        raise ValueError(f"generate: prefix_multiple must be >= 1, got {prefix_multiple}")
    length = -(-max(r.size for r in rows) // prefix_multiple) * prefix_multiple
    tokens, pad_len = left_pad(rows, length, vocab.pad_id if vocab is not None else 0)
    lo, hi, mask = _allowed_arrays(allowed, int(num_tokens), vocab_size, vocab)
    ctl = {
        "lo": lo, "hi": hi, "forced": _forced_array(forced, batch, int(num_tokens), lo, hi, mask),
        "keys": sampling.row_keys(batch), "temperature": np.float32(sampling.temperature),
        "top_k": np.int32(sampling.top_k), "top_p": np.float32(sampling.top_p),
        "guidance_scale": np.float32(sampling.guidance_scale),
    }
    if mask is not None:
        ctl["mask"] = mask
    statics = _Statics(num_tokens=int(num_tokens), guided=guided, has_mask=mask is not None, layer_loop=layer_loop)
    graphdef, state = nnx.split(model)
    run = _generate_cached if use_cache else _generate_uncached
    if text_embeddings is not None:
        text_embeddings = np.asarray(text_embeddings, np.float32)
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] != len(rows):
            raise ValueError(f"generate: text_embeddings must be [{len(rows)} rows, num_text, dim], "
                             f"got {text_embeddings.shape}")
    return np.asarray(run(graphdef, state, tokens, pad_len, ctl, text_embeddings, statics=statics))


# ----------------------------------------------------------------------------------- long video


def context_latent_frames(seconds: float, fps: float, time_factor: int = 4) -> int:
    """Latent frames whose pixel frames (``1 + time_factor * (k - 1)``) best cover ``seconds``."""
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"context_latent_frames: seconds and fps must be positive, got {seconds}, {fps}")
    return max(1, 1 + int(round((seconds * fps - 1) / time_factor)))


def future_prefix(vocab: VocabLayout, context_codes, options: tasks.TaskOptions = tasks.TaskOptions()) -> np.ndarray:
    """The future-prediction prefix ``<bos> <task_video> <bov_i> context <eov_i> <res>`` (tasks.py)."""
    task = tasks.get_task("future")
    return np.asarray(tasks.head(task) + tasks.visual_in(vocab, context_codes) + tasks.res(options), np.int32)


@dataclasses.dataclass
class ExtendedVideo:
    """What ``extend_video`` made.

    Attributes:
      frames: the long video [num_frames, H, W, 3], as ``decode`` returns frames.
      chunk_tokens: video codes [t, h, w] of each clip: the input clip, then each generated one.
      context_tokens: codes [k, h, w] each generated clip was conditioned on (and starts with).
      prefixes: the prefix ids of each generation.
    """

    frames: np.ndarray
    chunk_tokens: list
    context_tokens: list
    prefixes: list


def _chunk_seed(seed, chunk: int) -> int:
    base = seed if isinstance(seed, (int, np.integer)) else seed[0]
    return int(np.random.SeedSequence([int(base), chunk]).generate_state(1)[0] % (2 ** 31))


def extend_video(model, video_tokens, *, num_frames: int, vocab: VocabLayout,
                 encode: Callable[[np.ndarray], np.ndarray], decode: Callable[[np.ndarray], np.ndarray],
                 context_latent_frames: int, time_factor: int = 4, sampling: SamplingConfig = SamplingConfig(),
                 options: tasks.TaskOptions = tasks.TaskOptions(), layer_loop: str | None = None) -> ExtendedVideo:
    """Extends a clip to ``num_frames`` frames by predicting the future from its last frames.

    Each round takes the last ``1 + time_factor * (k - 1)`` frames of the video so far
    (k = ``context_latent_frames``, about the last second), encodes them as a clip of their own
    (with a causal tokenizer these are the clip's k leading latent frames), and generates the
    future-prediction task's target from the prefix ``<bos> <task_video> <bov_i> context <eov_i>
    <res>``: a whole clip of the input's length whose first k latent frames are forced to the
    context. Its frames after the context are appended. With ``guidance_scale != 1`` the
    unconditional branch is the task's unconditional prefix.

    Args:
      model: the ``PrefixLM``.
      video_tokens: codes [t, h, w] of the first clip (every generated clip has t latent frames).
      num_frames: frames of the result (at least the first clip's, which is returned cut).
      encode: frames [T, H, W, 3] -> codes [t, h, w], e.g. ``VideoTokenizer.encode``.
      decode: codes [t, h, w] -> frames [1 + time_factor * (t - 1), H, W, 3], e.g. ``VideoTokenizer.decode``.
      context_latent_frames: k, in [1, t); ``context_latent_frames(1.0, fps)`` gives the last second.
      time_factor: pixel frames per latent frame after the first (the tokenizer's, 4 in VideoPoet).
    """
    video_tokens = np.asarray(video_tokens)
    if video_tokens.ndim != 3:
        raise ValueError(f"extend_video: video_tokens must be codes [t, h, w], got shape {video_tokens.shape}")
    t, h, w = video_tokens.shape
    k = int(context_latent_frames)
    if not 1 <= k < t:
        raise ValueError(f"extend_video: context_latent_frames={k} must be in [1, {t}) for clips of {t} latent frames")
    context_pixels = 1 + time_factor * (k - 1)
    layout = TargetLayout("video", video_shape=(t, h, w))
    frames = np.asarray(decode(video_tokens))
    if frames.shape[0] != 1 + time_factor * (t - 1):
        raise ValueError(f"extend_video: decode gave {frames.shape[0]} frames for {t} latent frames; expected "
                         f"{1 + time_factor * (t - 1)} (time_factor={time_factor})")
    chunks, contexts, prefixes, pieces = [video_tokens], [], [], [frames]
    total = frames.shape[0]
    uncond = [tasks.unconditional_prefix("future", options)] if sampling.guidance_scale != 1.0 else None
    while total < num_frames:
        context = np.asarray(encode(frames[-context_pixels:]))
        if context.shape != (k, h, w):
            raise ValueError(f"extend_video: encode of the last {context_pixels} frames gave codes {context.shape}; "
                             f"expected {(k, h, w)} (a causal tokenizer with time_factor={time_factor})")
        prefix = future_prefix(vocab, context, options)
        forced = layout.forced(vocab, video=context)
        chunk_sampling = dataclasses.replace(sampling, seed=(_chunk_seed(sampling.seed, len(chunks)),))
        target = generate(model, [prefix], num_tokens=layout.length, allowed=layout, sampling=chunk_sampling,
                          uncond_prefixes=uncond, vocab=vocab, forced=forced, layer_loop=layer_loop)[0]
        codes = layout.split(vocab, target)["video"]
        frames = np.asarray(decode(codes))
        new = frames[context_pixels:]
        chunks.append(codes)
        contexts.append(context)
        prefixes.append(prefix)
        pieces.append(new)
        total += new.shape[0]
    return ExtendedVideo(frames=np.concatenate(pieces)[:num_frames], chunk_tokens=chunks,
                         context_tokens=contexts, prefixes=prefixes)
