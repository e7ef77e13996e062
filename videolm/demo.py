"""`videolm demo` (the main job of `make demo`): the pipeline end to end on SoundShapes at toy scale.

Stages, each recorded in ``out_dir/stages/<name>.json`` with its settings and skipped when a run
with the same settings already finished it:

1. ``data``: build a small SoundShapes TFDS dataset in ``out_dir/data``;
2. ``ground_truth``: score the built test and compositional clips with the evaluator (each next
   to its shuffled-pair baseline);
3. the gallery ``out_dir/index.html``: each shown clip as mp4 with sound, its structure-only
   control video, caption and per-clip scores, and the evaluator's summary tables.

Later stages (tokenizers, the LM, generation) add their own stages and gallery sections.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

from videolm import gallery as gallery_lib
from videolm.data import build as build_lib
from videolm.data import tfds_soundshapes
from videolm.eval import metrics
from videolm.eval.evaluate_world import jsonable

SHOWN_SPLITS = ("test", "compositional")

# Per-clip scores shown under each clip (paths into metrics.score_clips' output).
CLIP_SCORES = {
    "caption exact match": ("caption", "exact_match"),
    "colour / shape / motion": None,  # filled from the three caption accuracies
    "trajectory error (px)": ("trajectory_error_px",),
    "pitch accuracy": ("audio_video", "pitch_accuracy"),
    "pitch error (cents)": ("audio_video", "pitch_error_cents"),
    "onset F1": ("audio_video", "onset_f1"),
    "audio-video lag (ms)": ("audio_video", "av_lag_ms"),
}


def _stage(out_dir: str, name: str, settings: dict, fn: Callable[[], Any], log=print) -> Any:
    """Runs ``fn`` unless ``out_dir/stages/name.json`` records a finished run with ``settings``."""
    path = os.path.join(out_dir, "stages", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if done.get("settings") == settings:
            log(f"[demo] {name}: already done ({path})")
            return done["result"]
    start = time.perf_counter()
    result = fn()
    record = {"settings": settings, "result": jsonable(result), "seconds": round(time.perf_counter() - start, 3)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    log(f"[demo] {name}: done in {record['seconds']:.1f} s")
    return record["result"]


def _reference(clip: dict) -> dict:
    """The annotations the evaluator compares against (the video itself is left out: PSNR vs itself)."""
    return {k: v for k, v in clip.items() if k not in ("video", "control")}


def _score(world, clips: list[dict], shuffle_seed: int = 0) -> dict:
    return metrics.score_clips(world, videos=[c["video"] for c in clips], audios=[c["audio"] for c in clips],
                               captions=[c["caption"] for c in clips],
                               references=[_reference(c) for c in clips], shuffle_seed=shuffle_seed)


def _get(scores: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(scores, dict) or key not in scores:
            return None
        scores = scores[key]
    return scores


def clip_scores(scores: dict) -> dict:
    """The short per-clip table of ``score_clips`` output for one clip."""
    table = {}
    for name, path in CLIP_SCORES.items():
        if path is None:
            table[name] = " / ".join(gallery_lib.format_value(_get(scores, ("caption", k)))
                                     for k in ("color", "shape", "motion"))
        else:
            table[name] = _get(scores, path)
    return table


def summary_columns(scores: dict) -> dict[str, dict]:
    """{'matched pairs': ..., 'shuffled pairs': ...} rows for the evaluator's summary table."""
    matched = {
        "caption": {k: v for k, v in scores.get("caption", {}).items() if k != "shuffled"},
        "audio-video": {k: v for k, v in scores.get("audio_video", {}).items() if k != "shuffled"},
        "trajectory error (px)": scores.get("trajectory_error_px"),
        "temporal": scores.get("temporal"),
        "audio vs annotations": scores.get("audio_reference"),
    }
    shuffled = {
        "caption": scores.get("caption", {}).get("shuffled"),
        "audio-video": scores.get("audio_video", {}).get("shuffled"),
    }
    return {"matched pairs": matched, "shuffled pairs": {k: v for k, v in shuffled.items() if v}}


def _load_clips(data_dir: str, split: str, count: int | None = None) -> tuple[list[dict], Any]:
    records, world = tfds_soundshapes.open_split(data_dir, split)
    n = len(records) if count is None else min(count, len(records))
    return [tfds_soundshapes.record_to_clip(records[i]) for i in range(n)], world


def run_demo(out_dir: str = "demo_out", *, resolution: int = 64, num_frames: int = 17,
             num_train: int = 256, num_validation: int = 32, num_test: int = 32,
             num_compositional: int = 32, num_shown: int = 6, progress: bool = True, log=print) -> dict:
    """Builds the data, scores the ground truth, writes ``out_dir/index.html``; returns a summary."""
    if num_shown < 1:
        raise ValueError(f"num_shown must be >= 1, got {num_shown}")
    if min(num_test, num_compositional) < 2:
        raise ValueError("num_test and num_compositional must be >= 2 (the shuffled-pair baseline needs two clips)")
    out_dir = os.path.abspath(out_dir)
    data_dir = os.path.join(out_dir, "data")
    data_settings = dict(resolution=resolution, num_frames=num_frames, num_train=num_train,
                         num_validation=num_validation, num_test=num_test, num_compositional=num_compositional)
    built = _stage(out_dir, "data", data_settings,
                   lambda: build_lib.build("soundshapes", data_dir, progress=progress, **data_settings), log)

    def score_ground_truth():
        result = {}
        for split in SHOWN_SPLITS:
            clips, world = _load_clips(data_dir, split)
            result[split] = {"all": _score(world, clips),
                             "clips": [_score(world, [clip]) for clip in clips[:num_shown]]}
        return result

    scores = _stage(out_dir, "ground_truth", dict(data_settings, num_shown=num_shown), score_ground_truth, log)

    gallery = gallery_lib.Gallery(
        out_dir, "videolm demo: SoundShapes",
        f"A SoundShapes dataset built with TFDS ({built['config']}, splits {built['split_sizes']}) and read "
        "back through the input pipeline; every clip is scored by the evaluator from its pixels and "
        "samples alone. Cross-modal scores sit next to a shuffled-pair baseline (each clip's video "
        "paired with another clip's caption or audio).")
    for split in SHOWN_SPLITS:
        clips, world = _load_clips(data_dir, split, num_shown)
        note = ("Colour x shape x motion combinations never seen in train." if split == "compositional"
                else "Held-out clips of the training distribution.")
        gallery.add_section(f"Ground truth: {split} split", note)
        for clip, per_clip in zip(clips, scores[split]["clips"]):
            gallery.add_row(f"{split} #{clip['index']}", [
                gallery_lib.Cell("video with sound", video=clip["video"], audio=clip["audio"], fps=world.fps,
                                 sample_rate=world.sample_rate, text=clip["caption"],
                                 scores=clip_scores(per_clip)),
                gallery_lib.Cell("control (structure only)", video=clip["control"], fps=world.fps),
            ])
        gallery.add_table(f"Evaluator on all {scores[split]['all']['num_clips']} {split} clips",
                          summary_columns(scores[split]["all"]))
    index = gallery.write()
    log(f"[demo] gallery: {index}")
    return {"index": index, "data": built, "scores": {s: scores[s]["all"] for s in SHOWN_SPLITS}}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", "--out-dir", dest="out_dir", default="demo_out",
                        help="where the data, stages and gallery go")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-shown", type=int, default=6, help="clips per split shown in the gallery")
    return parser


def run(args: argparse.Namespace) -> dict:
    summary = run_demo(args.out_dir, resolution=args.resolution, num_frames=args.num_frames,
                       num_train=args.num_train, num_shown=args.num_shown)
    print(json.dumps({"index": summary["index"], "scores": summary["scores"]}))
    return summary


def main(argv=None) -> dict:
    return run(add_arguments(argparse.ArgumentParser(prog="videolm demo")).parse_args(argv))


if __name__ == "__main__":
    main()
