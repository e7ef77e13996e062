"""Dataset registry: every video dataset becomes the same example dictionary.

    video    uint8   [T, H, W, 3]
    audio    float32 [S]            only when the dataset has sound (SoundShapes)
    text     str                    caption or class name; '' when the dataset has none
    control  uint8   [T, H, W, 3]   only SoundShapes: the structure-only video for stylization

``make_source(name, split, ...)`` returns a grain random-access source of such dicts. Clip options
shared by all datasets: ``num_frames`` frames taken ``frame_stride`` apart (``clip_start`` 'first',
'center' or 'random', the last drawn once per example from ``seed`` and the index), then
``resolution`` (an int for square frames or ``(height, width)``): the shorter side is scaled and
the centre cropped, so aspect ratios are never distorted. Audio is cut to the same time span.

SoundShapes is generated on the fly (``data_dir=None``) or read from a TFDS build (``videolm data
build``). The TFDS catalog datasets are read with ``tfds.data_source`` from an array_record
preparation in ``data_dir``; those whose features need TensorFlow (``Video``) raise an ImportError
naming the ``videolm[tf]`` extra when it is missing.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

Example = dict[str, Any]

SOUNDSHAPES = "soundshapes"
CLIP_STARTS = ("first", "center", "random")
TF_EXTRA_HINT = "pip install 'videolm[tf]'"


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
    """How one TFDS catalog dataset maps to the example dictionary."""
    tfds_name: str                      # name (optionally 'name/config') for tfds.data_source
    video_key: str                      # feature holding the frames ([T,H,W,C], C in 1, 3)
    label_key: str | None = None        # ClassLabel feature whose name becomes `text`
    fps: float | None = None            # native frame rate, for reference
    splits: tuple[str, ...] = ("train", "test")
    needs_tensorflow: bool = False      # the builder's features cannot be built without TF
    description: str = ""


CATALOG: dict[str, CatalogSpec] = {
    "ucf101": CatalogSpec(
        tfds_name="ucf101", video_key="video", label_key="label", fps=25.0,
        needs_tensorflow=True, description="101 human actions, variable length; text = action name"),
    "bair_robot_pushing_small": CatalogSpec(
        tfds_name="bair_robot_pushing_small", video_key="image_main", fps=10.0,
        description="robot arm pushing objects, 30 frames at 64x64; no text"),
    "moving_mnist": CatalogSpec(
        tfds_name="moving_mnist", video_key="image_sequence", splits=("test",),
        needs_tensorflow=True, description="two bouncing digits, 20 grey frames at 64x64; no text"),
}


def dataset_names() -> tuple[str, ...]:
    return (SOUNDSHAPES, *CATALOG)


# ----------------------------------------------------------------------------------------------
# Clip sampling and resizing (numpy / PIL, shared by every dataset)


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    num_frames: int | None = None       # None: keep every frame (after the stride)
    frame_stride: int = 1
    resolution: int | tuple[int, int] | None = None
    clip_start: str = "first"
    seed: int = 0

    def __post_init__(self):
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames <= 0):
            raise ValueError(f"num_frames must be a positive int or None, got {self.num_frames!r}")
        if not isinstance(self.frame_stride, int) or self.frame_stride <= 0:
            raise ValueError(f"frame_stride must be a positive int, got {self.frame_stride!r}")
        if self.clip_start not in CLIP_STARTS:
            raise ValueError(f"clip_start must be one of {CLIP_STARTS}, got {self.clip_start!r}")
        self.output_size  # validates resolution

    @property
    def output_size(self) -> tuple[int, int] | None:
        res = self.resolution
        if res is None:
            return None
        size = (res, res) if isinstance(res, int) else tuple(res)
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
            raise ValueError(f"resolution must be a positive int or (height, width), got {res!r}")
        return int(size[0]), int(size[1])


def clip_window(num_available: int, options: ClipOptions, index: int) -> tuple[int, int]:
    """(start, span): frames [start, start + span) hold the clip; span = num_frames * stride."""
    if options.num_frames is None:
        return 0, num_available
    span = options.num_frames * options.frame_stride
    slack = max(num_available - span, 0)
    if options.clip_start == "first":
        start = 0
    elif options.clip_start == "center":
        start = slack // 2
    else:
        start = int(np.random.default_rng([options.seed, index]).integers(0, slack + 1))
    return start, span


def sample_frames(video: np.ndarray, options: ClipOptions, index: int) -> tuple[np.ndarray, int, int]:
    """Takes the clip's frames; a video shorter than the clip repeats its last frame.

    Returns (frames [num_frames, H, W, C], start, span)."""
    start, span = clip_window(video.shape[0], options, index)
    picks = np.arange(start, start + span, options.frame_stride)
    picks = np.minimum(picks, video.shape[0] - 1)
    return video[picks], start, span


def resize_video(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T,H,W,C] -> [T,h,w,C]: scale the shorter side to fit, crop the centre (antialiased)."""
    t, h, w, c = video.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return video
    scale = max(out_h / h, out_w / w)
    scaled_h, scaled_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    top, left = (scaled_h - out_h) // 2, (scaled_w - out_w) // 2
    box = (left, top, left + out_w, top + out_h)
    out = np.empty((t, out_h, out_w, c), np.uint8)
    for i in range(t):
        frame = Image.fromarray(video[i] if c > 1 else video[i, ..., 0])
        frame = frame.resize((scaled_w, scaled_h), Image.Resampling.BILINEAR).crop(box)
        out[i] = np.asarray(frame).reshape(out_h, out_w, c)
    return out


def to_rgb(video: np.ndarray, where: str) -> np.ndarray:
    """uint8 [T,H,W] / [T,H,W,1] / [T,H,W,3] / [T,H,W,4] -> uint8 [T,H,W,3]."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 frames, got {video.dtype}")
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{where}: expected frames [T,H,W,C] with C in (1, 3, 4), got shape {video.shape}")
    if video.shape[-1] == 1:
        return np.repeat(video, 3, axis=-1)
    return video[..., :3]


def apply_clip(video: np.ndarray, options: ClipOptions, index: int, *, extra_videos: Sequence[np.ndarray] = (),
               audio: np.ndarray | None = None, fps: float | None = None, sample_rate: int | None = None):
    """Samples frames (and the matching audio span) and resizes. Returns (video, extras, audio)."""
    frames, start, span = sample_frames(video, options, index)
    picks_extra = [sample_frames(v, options, index)[0] for v in extra_videos]
    if audio is not None and options.num_frames is not None:
        samples_per_frame = sample_rate / fps
        first, count = round(start * samples_per_frame), round(span * samples_per_frame)
        clip_audio = audio[first:first + count]
        audio = np.pad(clip_audio, (0, count - clip_audio.shape[0]))
    size = options.output_size
    if size is not None:
        frames = resize_video(frames, size)
        picks_extra = [resize_video(v, size) for v in picks_extra]
    return frames, picks_extra, audio


# ----------------------------------------------------------------------------------------------
# Catalog datasets


def humanize_label(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup'; 'push_ups' -> 'push ups'."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name.replace("_", " "))
    return " ".join(words.lower().split())


def catalog_example(raw: Example, index: int, *, dataset: str, label_names: Sequence[str] | None,
                    options: ClipOptions) -> Example:
    """Maps one decoded catalog record (numpy dict from tfds) to the example dictionary."""
    spec = CATALOG[dataset]
    if spec.video_key not in raw:
        raise ValueError(f"{dataset}: record has no feature {spec.video_key!r} (has {sorted(raw)})")
    video = to_rgb(raw[spec.video_key], f"{dataset}/{spec.video_key}")
    text = ""
    if spec.label_key is not None:
        label = int(raw[spec.label_key])
        text = humanize_label(label_names[label]) if label_names is not None else str(label)
    video, _, _ = apply_clip(video, options, index)
    return {"video": video, "text": text}


def _tensorflow_missing(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, ImportError) and "tensorflow" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _open_catalog(dataset: str, split: str, data_dir: str | None):
    """tfds.data_source for a catalog dataset; a clear ImportError when TensorFlow is needed."""
    import tensorflow_datasets as tfds
    spec = CATALOG[dataset]
    if split.split("[")[0] not in spec.splits:
        raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {spec.splits}")
    try:
        importlib.import_module("tensorflow_datasets.video")  # registers the legacy video builders
        source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir)
    except ImportError as error:
        if _tensorflow_missing(error):
            raise ImportError(
                f"Reading the TFDS catalog dataset {dataset!r} needs TensorFlow (its builder uses "
                f"tfds.features.Video), which is not installed. Install the extra: {TF_EXTRA_HINT}") from error
        raise
    label_names = None
    if spec.label_key is not None:
        label_names = list(source.dataset_info.features[spec.label_key].names)
    return source, label_names


# ----------------------------------------------------------------------------------------------
# Sources


class MappedSource:
    """A random-access source applying ``fn(record, index)`` to another random-access source."""

    def __init__(self, source, fn: Callable[[Any, int], Example], num_examples: int | None = None,
                 name: str = ""):
        available = len(source)
        if num_examples is not None and not 0 < num_examples <= available:
            raise ValueError(f"{name or 'source'}: num_examples must be in [1, {available}], got {num_examples}")
        self._source, self._fn = source, fn
        self._len = available if num_examples is None else num_examples
        self._name = name

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"{self._name}: index {index} out of range [0, {self._len})")
        return self._fn(self._source[index], index)

    def __repr__(self) -> str:
        return f"MappedSource({self._name}, len={self._len})"


def soundshapes_example(clip: Example, index: int, *, fps: float, sample_rate: int,
                        options: ClipOptions) -> Example:
    """A generated clip or a stored TFDS record -> the example dictionary (with `control`)."""
    text = clip["caption"]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    video, (control,), audio = apply_clip(
        np.asarray(clip["video"]), options, index, extra_videos=(np.asarray(clip["control"]),),
        audio=np.asarray(clip["audio"], np.float32), fps=fps, sample_rate=sample_rate)
    return {"video": video, "audio": audio.astype(np.float32, copy=False), "text": str(text),
            "control": control}


class SoundShapesSource:
    """SoundShapes clips generated on demand: example ``i`` of ``split`` is always the same clip."""

    def __init__(self, world, split: str, num_examples: int, options: ClipOptions = ClipOptions()):
        from videolm.data import soundshapes
        if split not in soundshapes.SPLITS:
            raise ValueError(f"soundshapes: unknown split {split!r}; expected one of {soundshapes.SPLITS}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"soundshapes generated on the fly needs num_examples (a positive int), "
                             f"got {num_examples!r}")
        self.world = world if world is not None else soundshapes.WorldConfig()
        self.split, self._len, self._options = split, num_examples, options

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Example:
        from videolm.data import soundshapes
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"soundshapes/{self.split}: index {index} out of range [0, {self._len})")
        clip = soundshapes.generate_clip(self.world, self.split, index)
        return soundshapes_example(clip, index, fps=self.world.fps, sample_rate=self.world.sample_rate,
                                   options=self._options)

    def __repr__(self) -> str:
        return f"SoundShapesSource({self.split}, len={self._len}, world={self.world})"


def make_source(dataset: str, split: str, *, data_dir: str | None = None, world=None,
                num_examples: int | None = None, num_frames: int | None = None, frame_stride: int = 1,
                resolution: int | tuple[int, int] | None = None, clip_start: str = "first",
                seed: int = 0, config: str | None = None):
    """A random-access source of example dicts; see the module docstring."""
    options = ClipOptions(num_frames=num_frames, frame_stride=frame_stride, resolution=resolution,
                          clip_start=clip_start, seed=seed)
    if dataset == SOUNDSHAPES:
        if data_dir is None:
            if config is not None:
                raise ValueError("soundshapes: `config` selects a TFDS build and needs data_dir")
            return SoundShapesSource(world, split, num_examples, options)
        from videolm.data import tfds_soundshapes
        records, built_world = tfds_soundshapes.open_split(data_dir, split, config=config, world=world)
        fn = functools.partial(soundshapes_example, fps=built_world.fps, sample_rate=built_world.sample_rate,
                               options=options)
        return MappedSource(records, fn, num_examples, name=f"soundshapes/{split}")
    if dataset not in CATALOG:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {dataset_names()}")
    if world is not None or config is not None:
        raise ValueError(f"{dataset}: `world` and `config` apply to soundshapes only")
    records, label_names = _open_catalog(dataset, split, data_dir)
    fn = functools.partial(catalog_example, dataset=dataset, label_names=label_names, options=options)
    return MappedSource(records, fn, num_examples, name=f"{dataset}/{split}")

