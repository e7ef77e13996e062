"""The grain input pipeline: a random-access source of example dicts -> batches of numpy arrays.

Every training run reads its data through two calls::

    source = make_source("soundshapes", "train", data_dir=DIR)        # or data_dir=None: on the fly
    it = make_iterator(source, batch_size=8, seed=0)
    batch = next(it)   # {'video': uint8[8,T,H,W,3], 'audio': float32[8,S], 'text': str[8], ...}

The iterator is deterministic in ``(source, seed, process_index, process_count)``, reshuffles every
epoch, gives each JAX process a disjoint, equally long shard of the examples, and has
``get_state()``/``set_state()``: a run restored from a checkpoint that saved the iterator state
(``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` with orbax) sees exactly the batches it
would have seen had it never stopped.
"""
from __future__ import annotations

from typing import Any, Callable

import grain
import jax
from absl import flags

from videolm.data import registry

Example = dict[str, Any]

# Threads reading and transforming examples ahead of the consumer (per process). Generating
# SoundShapes clips or decoding array_record records is numpy work that releases the GIL in part;
# a few threads keep a small CPU busy without oversubscribing it.
DEFAULT_READ_THREADS = 4
DEFAULT_PREFETCH_BUFFER = 16


def make_source(dataset: str, split: str, *, data_dir: str | None = None, world=None,
                num_examples: int | None = None, **registry_options) -> grain.sources.RandomAccessDataSource:
    """A grain random-access source of example dicts for ``dataset``/``split``.

    ``'soundshapes'`` with ``data_dir=None`` generates clips on the fly from ``world`` (a
    ``WorldConfig``; default world when None), deterministic in ``(split, index)``, and then
    ``num_examples`` is required. With ``data_dir`` it reads the TFDS array_record data written by
    ``videolm data build``. Other names are TFDS catalog datasets (see ``registry.dataset_names()``).
    ``registry_options`` are the registry's clip options: ``num_frames``, ``frame_stride``,
    ``resolution``, ``clip_start``, ``seed`` (and ``config`` to pick one of several SoundShapes builds).
    """
    return registry.make_source(dataset, split, data_dir=data_dir, world=world,
                                num_examples=num_examples, **registry_options)


def _check_positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def make_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, transform: Callable[[Example], Example] | None = None,
                  drop_remainder: bool = True, worker_count: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  read_threads: int = DEFAULT_READ_THREADS) -> grain.DatasetIterator:
    """A grain ``DatasetIterator`` over batches (dicts of stacked numpy arrays) of ``source``.

    Args:
      source: anything with ``__len__`` and ``__getitem__`` returning an example dict.
      batch_size: examples per batch *on this process* (the global batch is
        ``batch_size * process_count``).
      seed: shuffle seed; each epoch is shuffled differently but deterministically.
      shuffle: False keeps the source order (evaluation).
      num_epochs: passes over the data; None repeats forever.
      transform: an optional per-example function, or a ``grain.transforms.Map`` /
        ``grain.transforms.RandomMap`` (the latter gets an rng seeded from ``seed`` and the
        position in the stream, so random augmentation is deterministic too).
      drop_remainder: drop a last incomplete batch (only matters when ``num_epochs`` is finite).
      worker_count: 0 reads in threads of this process; > 0 starts that many worker processes
        (the source and transform must then be picklable).
      process_index, process_count: the shard to read; default ``jax.process_index()`` and
        ``jax.process_count()``. Each process gets every ``process_count``-th example starting at
        ``process_index``, after truncating the source to a multiple of ``process_count`` so that
        all processes see the same number of batches.
      read_threads: reader threads per process.

    Strings (captions) come batched as numpy unicode arrays.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("num_epochs", num_epochs, allow_none=True)
    _check_positive("read_threads", read_threads)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 0:
        raise ValueError(f"worker_count must be an int >= 0, got {worker_count!r}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")

    num_examples = len(source)
    per_process = num_examples // process_count
    if per_process == 0:
        raise ValueError(f"the source has {num_examples} examples, fewer than process_count={process_count}")
    if drop_remainder and num_epochs is not None and per_process * num_epochs < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {per_process * num_epochs} examples "
                         f"this process reads in {num_epochs} epoch(s) with drop_remainder=True: no batch")

    ds = grain.MapDataset.source(source)
    ds = ds.slice(slice(process_index, per_process * process_count, process_count))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if transform is not None:
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=seed)
        else:
            ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=DEFAULT_PREFETCH_BUFFER))
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app nothing parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)
