"""Checkpoints of a run: model/optimizer state, data-iterator state and JSON metadata, together.

A thin layer over orbax's ``CheckpointManager`` with ``Composite`` items:

* ``state``: any pytree of arrays (an ``nnx.State``, a dict of them); restored against an
  abstract tree of ``jax.ShapeDtypeStruct`` so each leaf comes back with the dtype and sharding
  the caller asks for (restoring onto a different mesh works);
* ``data``: the grain iterator's state, so a resumed run sees exactly the batches it would have;
* ``meta``: JSON (step, config, vocabulary layout, ...).

Orbax writes each step to a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint behind as the latest one.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not match what the run expects."""


def _check_finite(tree: Any, step: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.inexact):
            if not bool(jax.numpy.isfinite(leaf).all()):
                raise FloatingPointError(
                    f"step {step}: refusing to checkpoint non-finite values in {jax.tree_util.keystr(path)}")


class Checkpointer:
    """Saves and restores ``(state, data iterator, metadata)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            })

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_iterator=None, metadata: dict | None = None,
             force: bool = False) -> bool:
        """Saves step ``step``; refuses (FloatingPointError) if any float leaf is NaN or inf."""
        _check_finite(state, step)
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave(dict(metadata or {}, step=int(step)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._manager.wait_until_finished()
        return saved

    def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator=None):
        """Returns ``(state, metadata)``; ``data_iterator`` is restored in place when given."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
        return restored["state"], restored["meta"]

    def restore_metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def abstract_like(tree: Any) -> Any:
    """Abstract (shape, dtype, sharding) of a pytree of arrays, for ``Checkpointer.restore``."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(leaf, tree)
