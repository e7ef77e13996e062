"""The task mixture: which task each training step trains, and its batch of equal-length sequences.

VideoPoet trains one model on many tasks by alternating gradients: every step takes one task and a
batch whose sequences all have the same length, so a step carries no padding. Here that is a pure
function of ``(seed, step)``:

* the step's task is drawn from the task weights, with the image/video curriculum (image tasks
  get ``image_share_early`` of the probability for the first ``curriculum_fraction`` of the steps,
  then ``image_share_late``);
* its examples are drawn from one bucket of the tokenized dataset, the examples whose captions
  have the same number of pieces (tasks without text draw from the whole dataset), so every
  sequence of the batch has the same length; continuation tasks draw one context length per batch;
* condition dropout replaces an example's prefix by its task's caption-free form (probability
  ``text_dropout``) or fully unconditional form (``uncond_dropout``), which is what
  classifier-free guidance contrasts at sampling time. The replaced prefix is shorter, so such
  examples are padded; the padding fraction is reported.

Being a function of the step, the batch stream is a grain ``MapDataset`` over step indices: it is
deterministic, host-sharded (each process builds its rows of the global batch) and resumable from
the iterator state saved in the checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence as Seq

import grain
import numpy as np

from videolm import tasks as tasks_lib
from videolm.vocab import VocabLayout


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Task weights and the schedule of the mixture.

    Attributes:
      weights: task name -> relative weight (within the image group or the video group).
      curriculum_fraction: the share of the run (from step 0) that favours images.
      image_share_early: probability mass on image tasks during the curriculum.
      image_share_late: probability mass on image tasks afterwards.
      text_dropout: probability that an example's caption is emptied.
      uncond_dropout: probability that an example loses every condition.
    """

    weights: Mapping[str, float]
    curriculum_fraction: float = 0.25
    image_share_early: float = 0.9
    image_share_late: float = 0.1
    text_dropout: float = 0.1
    uncond_dropout: float = 0.05

    def __post_init__(self):
        if not self.weights:
            raise ValueError("mixture weights: expected at least one task")
        for name, weight in self.weights.items():
            tasks_lib.get_task(name)
            if not weight >= 0:
                raise ValueError(f"mixture weight of {name!r} must be >= 0, got {weight}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("mixture weights: at least one must be positive")
        for field in ("curriculum_fraction", "image_share_early", "image_share_late", "text_dropout",
                      "uncond_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"mixture {field} must lie in [0, 1], got {value}")


def task_probabilities(mixture: MixtureConfig, step: int, num_steps: int) -> dict[str, float]:
    """Probability of each task at ``step`` (the curriculum splits image and video tasks)."""
    names = list(mixture.weights)
    is_image = np.array([tasks_lib.get_task(n).output == "image" for n in names])
    weights = np.array([mixture.weights[n] for n in names], np.float64)
    image_mass, other_mass = weights[is_image].sum(), weights[~is_image].sum()
    if image_mass == 0 or other_mass == 0:  # one group only: no curriculum to apply
        probs = weights / weights.sum()
    else:
        early = step < mixture.curriculum_fraction * num_steps
        share = mixture.image_share_early if early else mixture.image_share_late
        probs = np.where(is_image, share * weights / image_mass, (1 - share) * weights / other_mass)
    return dict(zip(names, probs.tolist()))


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 0x7a5c])


def step_task(mixture: MixtureConfig, seed: int, step: int, num_steps: int) -> str:
    probs = task_probabilities(mixture, step, num_steps)
    return str(_step_rng(seed, step).choice(list(probs), p=list(probs.values())))


def text_buckets(text_lengths: Seq[int], max_text_len: int) -> dict[int, np.ndarray]:
    """Example indices grouped by (truncated) caption length."""
    lengths = np.minimum(np.asarray(text_lengths, np.int64), max_text_len)
    return {int(n): np.flatnonzero(lengths == n) for n in np.unique(lengths)}


class MixtureBatches:
    """Random-access batches: ``batches[step]`` is this process's share of step ``step``'s batch.

    Each item: ``tokens`` int32 [b, L] (L the longest sequence rounded up to ``length_multiple``), ``prefix_len`` int32 [b], ``segment_ids`` int32 [b, L]
    (1 = real token, 0 = padding), ``task_id`` int32 [b] (index into ``task_names``), with
    ``b = batch_size / process_count``.
    """

    def __init__(self, examples, text_lengths: Seq[int], layout: VocabLayout, mixture: MixtureConfig, *,
                 batch_size: int, num_steps: int, seed: int, options: tasks_lib.TaskOptions = tasks_lib.TaskOptions(),
                 process_index: int = 0, process_count: int = 1, min_bucket: int | None = None,
                 length_multiple: int = 1):
        if len(examples) != len(text_lengths):
            raise ValueError(f"{len(examples)} examples but {len(text_lengths)} text lengths")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        self.examples, self.layout, self.mixture, self.options = examples, layout, mixture, options
        if length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
        self.batch_size, self.num_steps, self.seed = batch_size, num_steps, seed
        self.length_multiple = length_multiple
        self.rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        self.task_names = tuple(mixture.weights)
        self.all_indices = np.arange(len(examples))
        # Buckets too small to fill a batch without much repetition are merged into one padded
        # bucket: a few padded batches beat examples seen many times more often than the rest.
        min_bucket = batch_size if min_bucket is None else min_bucket
        buckets = text_buckets(text_lengths, options.max_text_len)
        big = {n: idx for n, idx in buckets.items() if len(idx) >= min_bucket}
        rest = [idx for n, idx in buckets.items() if len(idx) < min_bucket]
        self.buckets = list(big.values()) + ([np.concatenate(rest)] if rest else [])
        self.bucket_p = np.array([len(b) for b in self.buckets], np.float64) / len(examples)

    def __len__(self) -> int:
        return self.num_steps

    def step_plan(self, step: int) -> tuple[str, np.ndarray, np.random.Generator]:
        """(task, global example indices of the batch, rng for the batch's random choices)."""
        task = step_task(self.mixture, self.seed, step, self.num_steps)
        rng = _step_rng(self.seed, step)
        rng.random()  # the draw step_task consumed
        pool = self.buckets[rng.choice(len(self.buckets), p=self.bucket_p)] if tasks_lib.get_task(task).has_text \
            else self.all_indices
        indices = rng.choice(pool, size=self.batch_size, replace=len(pool) < self.batch_size)
        return task, indices, rng

    def __getitem__(self, step: int) -> dict:
        step = int(step)
        task, indices, rng = self.step_plan(step)
        # One context length / first-frame choice per batch keeps the lengths equal.
        batch_seed = int(rng.integers(2**31))
        drop = rng.random((self.batch_size, 2))
        sequences = []
        for row in range(self.rows.start, self.rows.stop):
            condition = "all"
            if drop[row, 0] < self.mixture.uncond_dropout:
                condition = "none"
            elif drop[row, 1] < self.mixture.text_dropout and tasks_lib.get_task(task).has_text:
                condition = "no_text"
            sequences.append(tasks_lib.build(task, self.examples[int(indices[row])], self.layout,
                                             rng=np.random.default_rng(batch_seed), options=self.options,
                                             condition=condition))
        # Lengths rounded up to a multiple bound the number of distinct shapes (compiled steps).
        length = max(len(s) for s in sequences)
        batch = pad_batch(sequences, self.layout.pad_id, length=round_up(length, self.length_multiple))
        batch["task_id"] = np.full((len(sequences),), self.task_names.index(task), np.int32)
        return batch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_batch(sequences: Seq[tasks_lib.Sequence], pad_id: int, length: int | None = None) -> dict:
    """Stacks sequences, right-padding each with ``pad_id`` in segment 0."""
    length = max(len(s) for s in sequences) if length is None else length
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    segment_ids = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence of task {seq.task!r} has {len(seq)} tokens, more than {length}")
        tokens[i, :len(seq)] = seq.tokens
        segment_ids[i, :len(seq)] = 1
    prefix_len = np.array([s.prefix_len for s in sequences], np.int32)
    return {"tokens": tokens, "prefix_len": prefix_len, "segment_ids": segment_ids}


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
    return float(1.0 - np.mean(np.asarray(batch["segment_ids"]) > 0))


def make_iterator(batches: MixtureBatches, *, start_step: int = 0, read_threads: int = 2,
                  prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable grain iterator over ``batches[start_step:]``."""
    ds = grain.MapDataset.source(batches)[start_step:]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)))


# ------------------------------------------------------------------------------ validation


def task_batches(examples, task: str, layout: VocabLayout, *, batch_size: int, seed: int = 0,
                 options: tasks_lib.TaskOptions = tasks_lib.TaskOptions(), max_examples: int | None = None):
    """Fixed validation batches of one task over ``examples`` (padded, in order, deterministic)."""
    count = len(examples) if max_examples is None else min(max_examples, len(examples))
    for start in range(0, count - count % batch_size, batch_size):
        sequences = [tasks_lib.build(task, examples[i], layout, rng=np.random.default_rng([seed, i]), options=options)
                     for i in range(start, start + batch_size)]
        yield pad_batch(sequences, layout.pad_id)


def unigram_baseline(train_examples, valid_examples, task: str, layout: VocabLayout, *,
                     options: tasks_lib.TaskOptions = tasks_lib.TaskOptions(), max_examples: int = 256) -> float:
    """Cross-entropy (nats per target token) of a unigram model of the task's targets.

    The unigram is fitted on up to ``max_examples`` training targets (add-one smoothed over the ids
    that occur in any target) and scored on the validation targets: the loss a model reaches by
    learning token frequencies alone, which a model that reads its prefix must beat.
    """
    def targets(examples):
        count = min(max_examples, len(examples))
        return np.concatenate([
            tasks_lib.build(task, examples[i], layout, rng=np.random.default_rng([0, i]), options=options).target
            for i in range(count)])

    train, valid = targets(train_examples), targets(valid_examples)
    support = np.union1d(train, valid)
    counts = np.array([np.sum(train == t) for t in support], np.float64) + 1.0
    log_p = dict(zip(support.tolist(), np.log(counts / counts.sum()).tolist()))
    return float(-np.mean([log_p[t] for t in valid.tolist()]))
