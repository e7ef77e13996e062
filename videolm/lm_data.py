"""The LM's data: the task mixture over token shards, or synthetic sequences of the same layout.

``config.data.dataset``:

* ``'tokens'``: the shards ``videolm tokenize`` wrote in ``config.data.tokens_dir``. The vocabulary
  layout is the shards' ``layout.json``. Every training step trains one task of the mixture
  (``config.mixture``, see videolm/mixture.py) on a batch of equal-length sequences; validation
  scores each task separately on fixed batches of the validation split.
* ``'synthetic'``: ``SyntheticSequences`` (no tokenizers needed), for tests and benchmarks.

A batch: ``tokens`` int32 [b, S + 1], ``prefix_len`` int32 [b], optionally ``segment_ids``
[b, S + 1] (0 = padding), ``positions`` and ``text_embeddings``; other keys are ignored by the
step. ``b`` is this process's share of the global batch.
"""
from __future__ import annotations

import itertools
import os

import jax
import numpy as np

from videolm import configlib, mixture, tasks, vocab as vocab_lib

DATASETS = ("tokens", "synthetic")


def check_dataset(config) -> None:
    if config.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset {config.data.dataset!r} is not available to the LM; known: "
                         f"{', '.join(DATASETS)}")
    if config.data.dataset == "tokens":
        tokens_dir = config.data.get("tokens_dir", "")
        if not tokens_dir:
            raise ValueError("data.tokens_dir is empty: expected the workdir of `videolm tokenize` "
                             "(--config.data.tokens_dir=DIR), or data.dataset=synthetic")
        if not os.path.exists(os.path.join(tokens_dir, "layout.json")):
            raise FileNotFoundError(f"data.tokens_dir={tokens_dir} holds no layout.json: expected the workdir "
                                    "of a finished `videolm tokenize` run")


def build_layout(config) -> vocab_lib.VocabLayout:
    """The vocabulary: the token shards' layout, or the one ``config.vocab`` describes."""
    check_dataset(config)
    if config.data.dataset == "tokens":
        from videolm.tokenize import load_layout
        return load_layout(config.data.tokens_dir)
    return vocab_layout(config.vocab)


def vocab_layout(vocab_config) -> vocab_lib.VocabLayout:
    """The layout from the tokenizer configs named in ``config.vocab`` (or its explicit numbers)."""
    video = audio = None
    if vocab_config.get("video_tokenizer_config"):
        video = configlib.load_config(vocab_config.video_tokenizer_config)
    if vocab_config.get("audio_tokenizer_config"):
        audio = configlib.load_config(vocab_config.audio_tokenizer_config)
    return vocab_lib.layout_from_configs(
        vocab_config.text_size, video, audio, video_bits=vocab_config.video_bits,
        audio_levels=vocab_config.audio_levels, audio_codes=vocab_config.audio_codes)


# ----------------------------------------------------------------------------------- the mixture


def mixture_config(config) -> mixture.MixtureConfig:
    m = config.mixture
    return mixture.MixtureConfig(
        weights=m.weights.to_dict(), curriculum_fraction=m.curriculum_fraction, image_share_early=m.image_share_early,
        image_share_late=m.image_share_late, text_dropout=m.text_dropout, uncond_dropout=m.uncond_dropout)


def task_options(config) -> tasks.TaskOptions:
    return tasks.TaskOptions(**config.tasks.to_dict())


def task_of(config, batch) -> str:
    """The task of a mixture batch (its ``task_id`` indexes the mixture's task names)."""
    return tuple(config.mixture.weights)[int(np.asarray(batch["task_id"]).reshape(-1)[0])]


def eval_task_names(config) -> list[str]:
    """The tasks validation scores: those of the mixture with a positive weight."""
    return [name for name, weight in config.mixture.weights.items() if weight > 0]


def _shards(config, split: str):
    from videolm.tokenize import TokenShards
    return TokenShards(config.data.tokens_dir, split)


def mixture_batches(config, layout) -> mixture.MixtureBatches:
    """The random-access training batches of the mixture (``batches[step]``: this process's rows)."""
    shards = _shards(config, "train")
    return mixture.MixtureBatches(
        shards, shards.text_lengths, layout, mixture_config(config), batch_size=config.data.batch_size,
        num_steps=config.train.num_steps, seed=config.seed, options=task_options(config),
        process_index=jax.process_index(), process_count=jax.process_count(),
        length_multiple=config.data.length_multiple)


def eval_sets(config, layout) -> dict[str, list[dict]]:
    """Validation batches by name: one set per task of the mixture (``'tokens'``), or ``'all'``.

    Every batch of every task is padded to one length, so validation compiles one program.
    """
    check_dataset(config)
    rows = slice(jax.process_index() * config.eval.batch_size // jax.process_count(),
                 (jax.process_index() + 1) * config.eval.batch_size // jax.process_count())
    if config.data.dataset == "synthetic":
        from videolm.data.pipeline import make_iterator
        batches = make_iterator(_synthetic(config, layout, "validation"), seed=config.seed, shuffle=False,
                                num_epochs=1, batch_size=config.eval.batch_size // jax.process_count())
        return {"all": list(itertools.islice(batches, config.eval.num_batches))}
    valid = _shards(config, "validation")
    options = task_options(config)
    max_examples = config.eval.num_batches * config.eval.batch_size
    if len(valid) < config.eval.batch_size:
        raise ValueError(f"the validation split of {config.data.tokens_dir} has {len(valid)} examples, fewer than "
                         f"eval.batch_size={config.eval.batch_size}")
    sets = {name: list(mixture.task_batches(valid, name, layout, batch_size=config.eval.batch_size, seed=config.seed,
                                            options=options, max_examples=max_examples))
            for name in eval_task_names(config)}
    length = mixture.round_up(max(b["tokens"].shape[1] for batches in sets.values() for b in batches),
                       config.data.length_multiple)
    return {name: [{k: v[rows] for k, v in _pad_to(b, length, layout.pad_id).items()} for b in batches]
            for name, batches in sets.items()}


def _pad_to(batch: dict, length: int, pad_id: int) -> dict:
    extra = length - batch["tokens"].shape[1]
    return {"tokens": np.pad(batch["tokens"], ((0, 0), (0, extra)), constant_values=pad_id),
            "segment_ids": np.pad(batch["segment_ids"], ((0, 0), (0, extra))),
            "prefix_len": batch["prefix_len"]}


def unigram_baselines(config, layout) -> dict[str, float]:
    """Each validated task's unigram cross-entropy (nats per target token); empty for synthetic data."""
    if config.data.dataset != "tokens":
        return {}
    train, valid = _shards(config, "train"), _shards(config, "validation")
    options = task_options(config)
    count = config.eval.num_batches * config.eval.batch_size
    return {name: mixture.unigram_baseline(train, [valid[i] for i in range(min(count, len(valid)))], name, layout,
                                           options=options)
            for name in eval_task_names(config)}


# ----------------------------------------------------------------------------------- training stream


def train_batches(config, layout):
    """The checkpointable grain iterator of training batches (this process's rows)."""
    from videolm.data.pipeline import make_iterator
    check_dataset(config)
    if config.data.dataset == "tokens":
        return mixture.make_iterator(mixture_batches(config, layout))
    return make_iterator(_synthetic(config, layout, "train"), batch_size=config.data.batch_size // jax.process_count(),
                         seed=config.seed, shuffle=True)


# ----------------------------------------------------------------------------------- synthetic data


class SyntheticSequences:
    """Deterministic token sequences of VideoPoet's layout with a learnable structure.

    ``<bos> <task_video_audio> <bot_i> text <eot_i> <bov_i> image <eov_i> <res_0> | <bov_o> video
    <eov_o> <boa_o> audio <eoa_o> <eos>``. The text and the image (``image_tokens`` codes drawn
    from the first ``image_codes`` video ids) are random; the video is the image moving: frame 0
    is the image and each next frame is the previous one rolled by -1, 0 or +1 positions, as
    chosen by the first text piece; the audio is level by level, each level one code set by the
    second text piece. A model that learns to copy with the right shift predicts the outputs
    exactly; the unigram baseline does not.

    With ``text_embed_dim > 0`` the text comes as precomputed embeddings instead (the paper's
    T5 route): the text positions hold ``<text_emb>`` placeholders and ``text_embeddings``
    [text_len, text_embed_dim] are the pieces' rows of a fixed random table.
    """

    def __init__(self, layout: vocab_lib.VocabLayout, *, num_examples: int, text_len: int, image_tokens: int,
                 video_frames: int, audio_frames: int, image_codes: int, seed: int = 0, split: str = "train",
                 text_embed_dim: int = 0):
        if layout.text_size < 3 or layout.video_size < image_codes or layout.audio_levels < 1:
            raise ValueError(f"synthetic data needs text_size >= 3, 2**video_bits >= image_codes={image_codes} "
                             f"and audio levels; got {layout}")
        if text_len < 2:
            raise ValueError(f"data.text_len must be >= 2, got {text_len}")
        self.layout, self.num_examples, self.seed = layout, num_examples, seed
        self.text_len, self.image_tokens, self.video_frames = text_len, image_tokens, video_frames
        self.audio_frames, self.image_codes = audio_frames, image_codes
        self.split_id = {"train": 0, "validation": 1, "test": 2}[split]
        self.text_table = (np.random.default_rng([seed, 99]).normal(size=(layout.text_size, text_embed_dim))
                           .astype(np.float32) if text_embed_dim else None)
        self.prefix_len = text_len + image_tokens + 7
        self.length = (self.prefix_len + 1 + video_frames * image_tokens + 1
                       + 1 + layout.audio_levels * audio_frames + 1 + 1)

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        layout, sp = self.layout, self.layout.special
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        text = rng.integers(0, layout.text_size, self.text_len)
        image = rng.integers(0, self.image_codes, self.image_tokens)
        shift = int(text[0] % 3) - 1
        video = np.concatenate([np.roll(image, f * shift) for f in range(self.video_frames)])
        pitch = int(text[1]) % layout.audio_codes
        audio = (pitch + 7 * np.arange(layout.audio_levels)[:, None]) % layout.audio_codes
        audio = np.broadcast_to(audio, (layout.audio_levels, self.audio_frames))
        tokens = np.concatenate([
            [sp("<bos>"), layout.task("video_audio"), sp("<bot_i>")], layout.text_ids(text), [sp("<eot_i>")],
            [sp("<bov_i>")], layout.video_ids(image), [sp("<eov_i>"), sp("<res_0>")],
            [sp("<bov_o>")], layout.video_ids(video), [sp("<eov_o>")],
            [sp("<boa_o>")], layout.audio_ids(audio).reshape(-1), [sp("<eoa_o>"), sp("<eos>")],
        ]).astype(np.int32)
        assert tokens.shape == (self.length,)
        example = {"tokens": tokens, "prefix_len": np.int32(self.prefix_len)}
        if self.text_table is not None:
            tokens[3:3 + self.text_len] = sp("<text_emb>")
            example["text_embeddings"] = self.text_table[text]
        return example


def _synthetic(config, layout, split: str) -> SyntheticSequences:
    data = config.data
    return SyntheticSequences(layout, num_examples=data.num_examples if split == "train" else data.eval_examples,
                              text_len=data.text_len, image_tokens=data.image_tokens,
                              video_frames=data.video_frames, audio_frames=data.audio_frames,
                              image_codes=data.image_codes, seed=config.seed, split=split,
                              text_embed_dim=config.model.text_embed_dim)
