"""SoundShapes as a TFDS dataset, written as array_record and readable without TensorFlow.

Build (what ``videolm data build --dataset soundshapes`` runs)::

    config = soundshapes_config(WorldConfig(height=64, width=64), num_train=1000)
    builder = SoundShapes(config=config, data_dir=DIR)
    builder.download_and_prepare(file_format="array_record")

Read::

    records, world = open_split(DIR, "train")     # tfds random-access source + its WorldConfig

Each build config is named after its world (``64x64_17f_8fps_16khz``, with a hash suffix when
other world settings differ from the defaults) and stores the full ``WorldConfig`` and the split
sizes in the dataset's metadata, so a reader recovers exactly the world that made the data.

Features per example: ``video`` and ``control`` uint8 [T,H,W,3] (zlib), ``audio`` float32 [S],
``caption``, ``index`` (the generator index), ``background``, per object (``objects`` sequence,
caption order) its ``color``, ``shape``, ``motion``, ``size``, ``speed``, ``centroids`` [T,2],
``boxes`` [T,4], ``pitch_hz`` [T], and the wall contacts (``bounce_times``/``bounce_frames``, flat,
with the owning object in ``bounce_*_objects``). ``record_to_clip`` turns a stored example back
into ``generate_clip``'s dictionary (without the masks).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from videolm.data import soundshapes
from videolm.data.soundshapes import WorldConfig

NAME = "soundshapes"
VERSION = tfds.core.Version("1.0.0")
DEFAULT_SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100, "compositional": 100}


def world_to_dict(world: WorldConfig) -> dict[str, Any]:
    return {f.name: getattr(world, f.name) for f in dataclasses.fields(world)}


def world_from_dict(values: dict[str, Any]) -> WorldConfig:
    """Inverse of ``world_to_dict`` after a JSON round trip (lists back to tuples)."""
    known = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"stored SoundShapes world has fields this WorldConfig lacks: {sorted(unknown)}")
    return WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_name(world: WorldConfig) -> str:
    """'64x64_17f_8fps_16khz', plus '_w<hash>' when any other world field is not the default."""
    name = f"{world.height}x{world.width}_{world.num_frames}f_{world.fps:g}fps_{world.sample_rate / 1000:g}khz"
    name = name.replace(".", "p")
    named = {"height", "width", "num_frames", "fps", "sample_rate"}
    default = world_to_dict(WorldConfig())
    rest = {k: v for k, v in world_to_dict(world).items() if k not in named and v != default[k]}
    if rest:
        digest = hashlib.sha1(json.dumps(rest, sort_keys=True, default=list).encode()).hexdigest()[:8]
        name += f"_w{digest}"
    return name


@dataclasses.dataclass(eq=False)
class SoundShapesConfig(tfds.core.BuilderConfig):
    """A SoundShapes build: the world and how many clips each split holds."""
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    split_sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))


def soundshapes_config(world: WorldConfig | None = None, *, num_train: int = DEFAULT_SPLIT_SIZES["train"],
                       num_validation: int = DEFAULT_SPLIT_SIZES["validation"],
                       num_test: int = DEFAULT_SPLIT_SIZES["test"],
                       num_compositional: int = DEFAULT_SPLIT_SIZES["compositional"]) -> SoundShapesConfig:
    world = world if world is not None else WorldConfig()
    world.validate()
    sizes = {"train": num_train, "validation": num_validation, "test": num_test,
             "compositional": num_compositional}
    for split, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"num_{split} must be an int >= 0, got {size!r}")
    if not any(sizes.values()):
        raise ValueError("a SoundShapes build needs at least one non-empty split")
    return SoundShapesConfig(
        name=config_name(world), version=VERSION, world=world, split_sizes=sizes,
        description=f"SoundShapes {world.height}x{world.width}, {world.num_frames} frames at {world.fps:g} fps, "
                    f"audio at {world.sample_rate} Hz")


def _features(world: WorldConfig) -> tfds.features.FeaturesDict:
    zlib = tfds.features.Encoding.ZLIB
    frames = (world.num_frames, world.height, world.width, 3)
    T = world.num_frames
    return tfds.features.FeaturesDict({
        "video": tfds.features.Tensor(shape=frames, dtype=np.uint8, encoding=zlib),
        "control": tfds.features.Tensor(shape=frames, dtype=np.uint8, encoding=zlib),
        "audio": tfds.features.Tensor(shape=(world.num_samples,), dtype=np.float32,
                                      encoding=tfds.features.Encoding.BYTES),
        "caption": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
        "background": tfds.features.Text(),
        "objects": tfds.features.Sequence({
            "color": tfds.features.Text(),
            "shape": tfds.features.Text(),
            "motion": tfds.features.Text(),
            "size": tfds.features.Scalar(dtype=np.float32),
            "speed": tfds.features.Scalar(dtype=np.float32),
            "centroids": tfds.features.Tensor(shape=(T, 2), dtype=np.float32),
            "boxes": tfds.features.Tensor(shape=(T, 4), dtype=np.float32),
            "pitch_hz": tfds.features.Tensor(shape=(T,), dtype=np.float32),
        }),
        # Wall contacts, object by object (ragged per object, so stored flat with the object index).
        "bounce_times": tfds.features.Tensor(shape=(None,), dtype=np.float64,
                                              encoding=tfds.features.Encoding.BYTES),
        "bounce_time_objects": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "bounce_frames": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "bounce_frame_objects": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    })


def clip_record(clip: dict) -> dict:
    """A ``generate_clip`` dict -> the stored TFDS example."""
    return {
        "video": clip["video"], "control": clip["control"], "audio": clip["audio"],
        "caption": clip["caption"], "index": clip["index"], "background": clip["background"],
        "objects": {
            "color": list(clip["colors"]), "shape": list(clip["shapes"]), "motion": list(clip["motions"]),
            "size": clip["sizes"], "speed": clip["speeds"], "centroids": clip["centroids"],
            "boxes": clip["boxes"], "pitch_hz": clip["pitch_hz"],
        },
        **_flatten_per_object("bounce_times", clip["bounce_times"], np.float64),
        **_flatten_per_object("bounce_frames", clip["bounce_frames"], np.int32),
    }


def _flatten_per_object(name: str, per_object, dtype) -> dict:
    values = [v for values in per_object for v in values]
    owners = [k for k, values in enumerate(per_object) for _ in values]
    return {name: np.asarray(values, dtype), f"{name[:-1]}_objects": np.asarray(owners, np.int32)}


def _unflatten_per_object(values, owners, num_objects: int, cast) -> list[list]:
    return [[cast(v) for v, k in zip(values, owners) if k == obj] for obj in range(num_objects)]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_clip(record: dict) -> dict:
    """A decoded stored example -> a dict with ``generate_clip``'s keys (all but 'masks' and 'split').

    This is what the evaluator takes as a reference (captions, trajectories, pitch, bounces)."""
    objects = record["objects"]
    n = len(objects["color"])
    return {
        "video": record["video"], "audio": record["audio"], "caption": _text(record["caption"]),
        "control": record["control"],
        "colors": [_text(c) for c in objects["color"]], "shapes": [_text(s) for s in objects["shape"]],
        "motions": [_text(m) for m in objects["motion"]],
        "sizes": np.asarray(objects["size"], np.float32), "speeds": np.asarray(objects["speed"], np.float32),
        "centroids": np.asarray(objects["centroids"], np.float32).reshape(n, -1, 2),
        "boxes": np.asarray(objects["boxes"], np.float32).reshape(n, -1, 4),
        "pitch_hz": np.asarray(objects["pitch_hz"], np.float32).reshape(n, -1),
        "bounce_times": _unflatten_per_object(record["bounce_times"], record["bounce_time_objects"], n, float),
        "bounce_frames": _unflatten_per_object(record["bounce_frames"], record["bounce_frame_objects"], n, int),
        "background": _text(record["background"]), "index": int(record["index"]),
    }


def _make_record(world: WorldConfig, split: str, index: int) -> tuple[int, dict]:
    return index, clip_record(soundshapes.generate_clip(world, split, index))


class SoundShapes(tfds.core.GeneratorBasedBuilder):
    """SoundShapes clips: video, structure-only control video, audio, caption and annotations."""

    name = NAME
    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [soundshapes_config(WorldConfig(height=64, width=64)),
                       soundshapes_config(WorldConfig(height=128, width=128))]
    # TFDS derives the code path through `importlib_resources`, which is only installed on old
    # Pythons; the builder's own file is the answer it would compute.
    code_path = epath.Path(__file__)

    def __init__(self, *, num_workers: int = 0, progress: bool = True, **kwargs):
        """``num_workers`` > 0 generates clips in that many processes; ``progress`` shows tqdm bars."""
        self._num_workers, self._progress = int(num_workers), progress
        super().__init__(**kwargs)

    def _create_builder_config(self, builder_config, version):
        # A build is named after its world; its split sizes may differ from the predefined config
        # of the same name (`videolm data build --num-train ...`), so a config object is taken as is.
        if isinstance(builder_config, SoundShapesConfig):
            return builder_config
        return super()._create_builder_config(builder_config, version)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            description="SoundShapes: coloured shapes that move, sound a tone set by their shape and "
                        "height, and click at each wall bounce; captions from a small grammar.",
            features=_features(config.world),
            disable_shuffling=True,   # record i of a split is generator index i
            metadata=tfds.core.MetadataDict(world=world_to_dict(config.world),
                                            split_sizes=dict(config.split_sizes)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated
        return {split: self._generate_examples(split, size)
                for split, size in self.builder_config.split_sizes.items() if size > 0}

    def _generate_examples(self, split: str, size: int):
        world = self.builder_config.world
        bar = tqdm(total=size, desc=f"soundshapes {split}", unit="clip", disable=not self._progress)
        with bar:
            if self._num_workers > 0:
                import multiprocessing
                with multiprocessing.get_context("spawn").Pool(self._num_workers) as pool:
                    jobs = ((world, split, i) for i in range(size))
                    for key, record in pool.imap(_star_make_record, jobs, chunksize=8):
                        bar.update()
                        yield key, record
            else:
                for index in range(size):
                    key, record = _make_record(world, split, index)
                    bar.update()
                    yield key, record


def _star_make_record(args):
    return _make_record(*args)


# ----------------------------------------------------------------------------------------------
# Reading


def find_builds(data_dir: str | os.PathLike) -> dict[str, epath.Path]:
    """{config name: version directory} of the SoundShapes builds under ``data_dir``.

    ``data_dir`` may be the TFDS data dir (holding ``soundshapes/``), the ``soundshapes`` folder, one
    config folder, or one version folder. The newest version of each config is returned.
    """
    root = epath.Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"SoundShapes data dir {str(root)!r} does not exist; build it with "
                                f"`videolm data build --dataset soundshapes --data-dir {root}`")
    if (root / "dataset_info.json").exists():
        return {root.parent.name: root}
    for base in (root / NAME, root, root.parent):
        builds = {}
        for info in sorted(base.glob("*/*/dataset_info.json")):
            version_dir = info.parent
            try:
                tfds.core.Version(version_dir.name)
            except ValueError:
                continue
            builds[version_dir.parent.name] = version_dir   # sorted: the last one is the newest
        if builds:
            return builds
        if base == root and any(root.glob("*/dataset_info.json")):  # a config folder
            versions = sorted(root.glob("*/dataset_info.json"))
            return {root.name: versions[-1].parent}
    return {}


def select_build(data_dir, *, config: str | None = None, world: WorldConfig | None = None) -> epath.Path:
    """The version directory of the build named ``config``, or made from ``world``, or the only one."""
    builds = find_builds(data_dir)
    if not builds:
        raise FileNotFoundError(f"no SoundShapes build under {str(data_dir)!r}; build one with "
                                f"`videolm data build --dataset soundshapes --data-dir {data_dir}`")
    wanted = config if config is not None else (config_name(world) if world is not None else None)
    if wanted is None:
        if len(builds) > 1:
            raise ValueError(f"{str(data_dir)!r} holds several SoundShapes builds {sorted(builds)}; "
                             f"pick one with config=... (or pass the world)")
        wanted = next(iter(builds))
    if wanted not in builds:
        raise FileNotFoundError(f"no SoundShapes build {wanted!r} under {str(data_dir)!r}; found {sorted(builds)}")
    return builds[wanted]


def stored_world(version_dir) -> tuple[WorldConfig, dict[str, int]]:
    """The WorldConfig and split sizes recorded by a build."""
    path = epath.Path(version_dir) / "metadata.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} is missing: not a SoundShapes build")
    meta = json.loads(path.read_text())
    return world_from_dict(meta["world"]), dict(meta["split_sizes"])


def open_split(data_dir, split: str, *, config: str | None = None, world: WorldConfig | None = None):
    """(tfds random-access source of decoded records, WorldConfig) for one built split."""
    version_dir = select_build(data_dir, config=config, world=world)
    built_world, sizes = stored_world(version_dir)
    if world is not None and world != built_world:
        raise ValueError(f"the SoundShapes build at {str(version_dir)!r} was made with a different world "
                         f"than the one passed:\n  built:  {built_world}\n  passed: {world}")
    if sizes.get(split, 0) <= 0:
        built = [s for s, n in sizes.items() if n > 0]
        raise ValueError(f"split {split!r} is not in the SoundShapes build at {str(version_dir)!r}; "
                         f"it has {built}")
    builder = tfds.builder_from_directory(os.fspath(version_dir))
    return builder.as_data_source(split=split), built_world
