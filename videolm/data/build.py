"""`videolm data build`: writes a dataset as TFDS array_record files.

    videolm data build --dataset soundshapes --data-dir DIR --resolution 64 --num-train 1000

Only SoundShapes is generated here; TFDS catalog datasets are prepared with TFDS itself
(``tfds build NAME --file_format=array_record``, which needs ``pip install 'videolm[tf]'``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time

from videolm.data import registry, tfds_soundshapes
from videolm.data.soundshapes import WorldConfig

BUILDABLE = (registry.SOUNDSHAPES,)


@contextlib.contextmanager
def _tfds_progress_bars(enabled: bool):
    """Turns TFDS's own progress bars on/off for a block (ours show the clip counts instead)."""
    from tensorflow_datasets.core.utils import tqdm_utils
    previous = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(enabled)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(previous)


def build(dataset: str, data_dir: str, *, resolution: int | tuple[int, int] = 64,
          num_frames: int = 17, fps: float = 8.0, sample_rate: int = 16000,
          num_train: int = tfds_soundshapes.DEFAULT_SPLIT_SIZES["train"],
          num_validation: int = tfds_soundshapes.DEFAULT_SPLIT_SIZES["validation"],
          num_test: int = tfds_soundshapes.DEFAULT_SPLIT_SIZES["test"],
          num_compositional: int = tfds_soundshapes.DEFAULT_SPLIT_SIZES["compositional"],
          world: WorldConfig | None = None, num_workers: int = 0, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Builds ``dataset`` under ``data_dir``; returns a summary dict (path, config, sizes, timing).

    ``world`` overrides resolution/num_frames/fps/sample_rate with a full WorldConfig. An existing
    build of the same world with the same split sizes is kept (``skipped: True``); one with other
    sizes raises unless ``overwrite``.
    """
    if dataset not in BUILDABLE:
        if dataset in registry.CATALOG:
            raise ValueError(
                f"{dataset!r} is a TFDS catalog dataset: prepare it with TFDS "
                f"(`tfds build {registry.CATALOG[dataset].tfds_name} --file_format=array_record "
                f"--data_dir {data_dir}`, after {registry.TF_EXTRA_HINT}) and read it with make_source")
        raise ValueError(f"unknown dataset {dataset!r}; `data build` can build {BUILDABLE}")
    if world is None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        world = WorldConfig(height=height, width=width, num_frames=num_frames, fps=float(fps),
                            sample_rate=sample_rate)
    config = tfds_soundshapes.soundshapes_config(
        world, num_train=num_train, num_validation=num_validation, num_test=num_test,
        num_compositional=num_compositional)
    builder = tfds_soundshapes.SoundShapes(config=config, data_dir=data_dir, num_workers=num_workers,
                                           progress=progress)
    version_dir = builder.data_path
    summary = {"dataset": dataset, "config": config.name, "path": str(version_dir),
               "split_sizes": dict(config.split_sizes), "world": tfds_soundshapes.world_to_dict(world)}
    if (version_dir / "dataset_info.json").exists():
        _, built_sizes = tfds_soundshapes.stored_world(version_dir)
        if built_sizes == config.split_sizes and not overwrite:
            return {**summary, "skipped": True}
        if not overwrite:
            raise FileExistsError(
                f"{str(version_dir)!r} already holds SoundShapes {config.name} with split sizes {built_sizes}, "
                f"not {config.split_sizes}; pass overwrite=True (--overwrite) or use another data dir")
        shutil.rmtree(version_dir)
        builder = tfds_soundshapes.SoundShapes(config=config, data_dir=data_dir, num_workers=num_workers,
                                               progress=progress)
    start = time.perf_counter()
    with _tfds_progress_bars(False):
        builder.download_and_prepare(file_format="array_record")
    seconds = time.perf_counter() - start
    clips = sum(config.split_sizes.values())
    return {**summary, "skipped": False, "seconds": round(seconds, 3),
            "clips_per_second": round(clips / seconds, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `data build` options to ``parser``; ``run(args)`` then builds."""
    defaults = tfds_soundshapes.DEFAULT_SPLIT_SIZES
    parser.add_argument("--dataset", required=True, choices=BUILDABLE + tuple(registry.CATALOG),
                        help="dataset to build (catalog datasets explain how TFDS prepares them)")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--resolution", type=int, default=64, help="frame height and width in pixels")
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio samples per second")
    for split in ("train", "validation", "test", "compositional"):
        parser.add_argument(f"--num-{split}", type=int, default=defaults[split], help=f"clips in {split}")
    parser.add_argument("--num-workers", type=int, default=0, help="generator processes (0: in process)")
    parser.add_argument("--overwrite", action="store_true", help="replace a build with other split sizes")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Builds from parsed ``add_arguments`` options and prints the summary as one JSON line."""
    summary = build(args.dataset, args.data_dir, resolution=args.resolution, num_frames=args.num_frames,
                    fps=args.fps, sample_rate=args.sample_rate, num_train=args.num_train,
                    num_validation=args.num_validation, num_test=args.num_test,
                    num_compositional=args.num_compositional, num_workers=args.num_workers,
                    overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "world"}))
    return summary


def main(argv=None) -> dict:
    parser = add_arguments(argparse.ArgumentParser(prog="videolm data build", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
