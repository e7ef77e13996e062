"""VideoPoet's pretraining tasks: a tokenized clip -> (prefix ids, target ids).

Every task writes one sequence in the layout of the paper (DESIGN.md section 4)::

    <bos> <task> [<bot_i> text <eot_i>] [<bov_i> visual-in <eov_i>] [<boa_i> audio-in <eoa_i>] <res>
      | <bov_o> video-out <eov_o> [<boa_o> audio-out <eoa_o>] <eos>

The model attends bidirectionally over the prefix (everything before ``|``) and causally over the
target, and the loss covers the target only. ``<task>`` names the output type; the inputs are
told by the ``<bo*_i>`` blocks present. Text-to-image ends after the image's tokens (no
``<eov_o>``/``<eos>``) so that an image can be continued into a video.

A tokenized example (what ``videolm tokenize`` writes per clip) holds, in tokenizer codes (not yet
unified ids):

    text        int32 [n]          sentencepiece pieces of the caption
    video       int32 [t, h, w]    video tokens of the clip
    image       int32 [1, h, w]    tokens of the first frame encoded alone (== video[:1], causal)
    audio       int32 [L, f]       audio tokens, level by level
    control     int32 [t, h, w]    tokens of the structure-only control video (stylization)
    inpaint     int32 [t, h, w]    tokens of the clip with its central region masked
    outpaint    int32 [t, h, w]    tokens of the clip with its borders masked

Each task is a small function registered by name in ``TASKS``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from videolm.vocab import VocabLayout

OUTPUT_TYPES = ("video", "image", "audio", "video_audio")


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Settings of sequence construction.

    Attributes:
      max_text_len: captions are truncated to this many pieces.
      res_token: index of the ``<res_i>`` token (output resolution / aspect code).
      min_context_frames: fewest latent frames given as context to future prediction and
        audio-video continuation (the first latent frame is the first pixel frame alone).
      stylize_first_frame_prob: how often stylization also conditions on the first frame.
      context_frames: when > 0, continuation tasks see exactly this many latent frames (as at
        sampling time, where the given clip sets them) instead of a random count.
    """

    max_text_len: int = 32
    res_token: int = 0
    min_context_frames: int = 1
    stylize_first_frame_prob: float = 0.5
    context_frames: int = 0


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One training sequence: ``tokens = prefix + target``; the loss covers ``tokens[prefix_len:]``."""

    task: str
    prefix: np.ndarray  # int32 [P]
    target: np.ndarray  # int32 [T]

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([self.prefix, self.target]).astype(np.int32)

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.shape[0])

    def __len__(self) -> int:
        return int(self.prefix.shape[0] + self.target.shape[0])


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    output: str  # one of OUTPUT_TYPES
    inputs: tuple[str, ...]  # example fields the task reads
    build: Callable[..., tuple[list, list]]
    has_text: bool


TASKS: dict[str, Task] = {}


class UnknownTaskError(ValueError):
    pass


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _register(name: str, output: str, inputs: tuple[str, ...], *, has_text: bool):
    def decorator(fn):
        TASKS[name] = Task(name=name, output=output, inputs=inputs, build=fn, has_text=has_text)
        return fn
    return decorator


# ------------------------------------------------------------------------------------ pieces


def _s(name: str) -> int:
    return VocabLayout.special(name)


def text_block(layout: VocabLayout, pieces, options: TaskOptions) -> list[int]:
    """``<bot_i> text <eot_i>`` (an empty caption gives the unconditional ``<bot_i> <eot_i>``)."""
    pieces = np.asarray(pieces, np.int64).reshape(-1)[: options.max_text_len]
    return [_s("<bot_i>"), *layout.text_ids(pieces).tolist(), _s("<eot_i>")]


def visual_in(layout: VocabLayout, codes, *, source: bool = False) -> list[int]:
    """``<bov_i> [<source>] codes <eov_i>``; ``<source>`` marks a structure (control) video."""
    ids = layout.video_ids(np.asarray(codes).reshape(-1)).tolist()
    return [_s("<bov_i>"), *([_s("<source>")] if source else []), *ids, _s("<eov_i>")]


def audio_in(layout: VocabLayout, codes) -> list[int]:
    """``<boa_i> level-1 frames, level-2 frames, ... <eoa_i>``."""
    return [_s("<boa_i>"), *layout.audio_ids(np.asarray(codes)).reshape(-1).tolist(), _s("<eoa_i>")]


def video_out(layout: VocabLayout, codes, *, close: bool = True) -> list[int]:
    ids = layout.video_ids(np.asarray(codes).reshape(-1)).tolist()
    return [_s("<bov_o>"), *ids, *([_s("<eov_o>")] if close else [])]


def audio_out(layout: VocabLayout, codes) -> list[int]:
    return [_s("<boa_o>"), *layout.audio_ids(np.asarray(codes)).reshape(-1).tolist(), _s("<eoa_o>")]


def head(task: Task) -> list[int]:
    return [_s("<bos>"), VocabLayout.task(task.output)]


def res(options: TaskOptions) -> list[int]:
    return [_s(f"<res_{options.res_token}>")]


def context_frames(num_latent_frames: int, rng: np.random.Generator, options: TaskOptions) -> int:
    """How many leading latent frames a continuation task sees (at least one frame is predicted)."""
    if options.context_frames > 0:
        return max(1, min(options.context_frames, num_latent_frames - 1))
    low = min(options.min_context_frames, num_latent_frames - 1)
    return int(rng.integers(max(low, 1), num_latent_frames)) if num_latent_frames > 1 else 1


def audio_context(audio: np.ndarray, video_context: int, num_latent_frames: int, temporal_ratio: int = 4) -> np.ndarray:
    """The audio frames that cover the same time as the first ``video_context`` latent frames."""
    pixel_frames = 1 + temporal_ratio * (num_latent_frames - 1)
    seen = 1 + temporal_ratio * (video_context - 1)
    count = int(np.floor(audio.shape[1] * seen / pixel_frames))
    return audio[:, :max(count, 1)]


# ------------------------------------------------------------------------------------ tasks
# Each builder: (task, example, layout, rng, options, conditional) -> (prefix, target);
# conditional=False empties the caption (``<bot_i> <eot_i>``) and keeps the other inputs.


def _text(task, ex, layout, options, conditional):
    return text_block(layout, ex["text"] if conditional else [], options)


@_register("unconditional", "video", ("video",), has_text=False)
def _unconditional(task, ex, layout, rng, options, conditional):
    return head(task) + res(options), video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("t2v", "video", ("text", "video"), has_text=True)
def _t2v(task, ex, layout, rng, options, conditional):
    prefix = head(task) + _text(task, ex, layout, options, conditional) + res(options)
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("t2i", "image", ("text", "image"), has_text=True)
def _t2i(task, ex, layout, rng, options, conditional):
    prefix = head(task) + _text(task, ex, layout, options, conditional) + res(options)
    return prefix, video_out(layout, ex["image"], close=False)


@_register("i2v", "video", ("text", "image", "video"), has_text=True)
def _i2v(task, ex, layout, rng, options, conditional):
    prefix = (head(task) + _text(task, ex, layout, options, conditional)
              + visual_in(layout, ex["image"]) + res(options))
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("future", "video", ("video",), has_text=False)
def _future(task, ex, layout, rng, options, conditional):
    video = np.asarray(ex["video"])
    k = context_frames(video.shape[0], rng, options)
    prefix = head(task) + visual_in(layout, video[:k]) + res(options)
    return prefix, video_out(layout, video) + [_s("<eos>")]


@_register("inpaint", "video", ("text", "inpaint", "video"), has_text=True)
def _inpaint(task, ex, layout, rng, options, conditional):
    prefix = (head(task) + _text(task, ex, layout, options, conditional)
              + visual_in(layout, ex["inpaint"]) + res(options))
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("outpaint", "video", ("text", "outpaint", "video"), has_text=True)
def _outpaint(task, ex, layout, rng, options, conditional):
    prefix = (head(task) + _text(task, ex, layout, options, conditional)
              + visual_in(layout, ex["outpaint"]) + res(options))
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("stylize", "video", ("text", "control", "image", "video"), has_text=True)
def _stylize(task, ex, layout, rng, options, conditional):
    with_first = rng.random() < options.stylize_first_frame_prob
    prefix = (head(task) + _text(task, ex, layout, options, conditional)
              + visual_in(layout, ex["control"], source=True)
              + (visual_in(layout, ex["image"]) if with_first else []) + res(options))
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("a2v", "video", ("audio", "video"), has_text=False)
def _a2v(task, ex, layout, rng, options, conditional):
    prefix = head(task) + audio_in(layout, ex["audio"]) + res(options)
    return prefix, video_out(layout, ex["video"]) + [_s("<eos>")]


@_register("v2a", "audio", ("video", "audio"), has_text=False)
def _v2a(task, ex, layout, rng, options, conditional):
    prefix = head(task) + visual_in(layout, ex["video"]) + res(options)
    return prefix, audio_out(layout, ex["audio"]) + [_s("<eos>")]


@_register("av_continuation", "video_audio", ("video", "audio"), has_text=False)
def _av_continuation(task, ex, layout, rng, options, conditional):
    video, audio = np.asarray(ex["video"]), np.asarray(ex["audio"])
    k = context_frames(video.shape[0], rng, options)
    prefix = (head(task) + visual_in(layout, video[:k])
              + audio_in(layout, audio_context(audio, k, video.shape[0])) + res(options))
    return prefix, video_out(layout, video) + audio_out(layout, audio) + [_s("<eos>")]


IMAGE_TASKS = tuple(name for name, t in TASKS.items() if t.output == "image")


CONDITIONS = ("all", "no_text", "none")


def unconditional_prefix(name: str, options: TaskOptions = TaskOptions()) -> list[int]:
    """The prefix with every condition removed: ``<bos> <task> [<bot_i> <eot_i>] <res>``."""
    task = get_task(name)
    return head(task) + ([_s("<bot_i>"), _s("<eot_i>")] if task.has_text else []) + res(options)


def build(name: str, example: Mapping[str, np.ndarray], layout: VocabLayout, *,
          rng: np.random.Generator | None = None, options: TaskOptions = TaskOptions(),
          condition: str = "all") -> Sequence:
    """The sequence of task ``name`` for one tokenized example.

    ``condition`` picks the conditioning kept in the prefix: ``'all'``; ``'no_text'`` (the caption
    emptied, other inputs kept: the unconditional branch of text guidance); ``'none'`` (every
    input dropped: the task's unconditional form). Condition dropout in training and the
    unconditional branch of classifier-free guidance use the same forms.
    """
    task = get_task(name)
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r}: expected one of {CONDITIONS}")
    missing = [field for field in task.inputs if field not in example]
    if missing:
        raise ValueError(f"task {name!r} needs example fields {list(task.inputs)}; missing {missing}")
    rng = rng if rng is not None else np.random.default_rng(0)
    prefix, target = task.build(task, example, layout, rng, options, condition == "all")
    if condition == "none":
        prefix = unconditional_prefix(name, options)
    return Sequence(task=name, prefix=np.asarray(prefix, np.int32), target=np.asarray(target, np.int32))
