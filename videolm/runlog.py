"""What a training run reports: TensorBoard scalars and media, a progress bar, finite-loss checks.

``RunLog`` writes to ``workdir/tensorboard`` (tensorboardX: no TensorFlow needed) and a plain
``workdir/metrics.jsonl`` that scripts and tests can read; only process 0 writes.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Mapping

import jax
import numpy as np
import tqdm


class NonFiniteError(FloatingPointError):
    """A loss or metric became NaN or inf; the message names the step and the quantities."""


def check_finite(metrics: Mapping[str, float], step: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteError(f"step {step}: non-finite values {bad}; no checkpoint was written for this step")


class RunLog:
    """Scalars, videos and progress of one run."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, desc: str = "train",
                 show_progress: bool | None = None):
        self.is_writer = jax.process_index() == 0
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_writer else None
        self._tb = None
        if self.is_writer:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if show_progress is None:
            show_progress = self.is_writer and sys.stderr.isatty()
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                              disable=not show_progress)

    def scalars(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
        """Logs scalars (after checking they are finite) and updates the progress line."""
        values = {k: float(v) for k, v in metrics.items()}
        check_finite(values, step)
        if not self.is_writer:
            return
        for key, value in values.items():
            self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._jsonl.write(json.dumps({"step": int(step), "split": prefix, **values}) + "\n")
        self._jsonl.flush()
        shown = {k: f"{v:.4g}" for k, v in list(values.items())[:4]}
        self._bar.set_postfix(shown, refresh=False)

    def video(self, step: int, tag: str, video: np.ndarray, fps: float = 8.0) -> None:
        """Logs a batch of clips uint8/float [N, T, H, W, 3] (float in [0, 1])."""
        if not self.is_writer:
            return
        video = np.asarray(video)
        if video.dtype != np.uint8:
            video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
        if importlib.util.find_spec("moviepy") is None:
            # tensorboardX renders videos through moviepy (not a dependency): without it, log one
            # image per clip with its frames side by side.
            n, t, h, w, c = video.shape
            strips = video.transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c)
            self._tb.add_images(tag, strips, step, dataformats="NHWC")
        else:
            self._tb.add_video(tag, video.transpose(0, 1, 4, 2, 3), step, fps=fps)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.is_writer:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def print(self, message: str) -> None:
        if self.is_writer:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        self._bar.close()
        if self.is_writer:
            self._tb.close()
            self._jsonl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
    """The rows of ``metrics.jsonl`` for one split, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("split") == split]
