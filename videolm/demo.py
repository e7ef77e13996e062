"""`videolm demo` (the main job of `make demo`): VideoPoet end to end on SoundShapes, from nothing.

Stages, each recorded in ``out_dir/stages/<name>.json`` with its settings and skipped when a run
with the same settings already finished it (the trainers also resume from their workdirs):

1. ``data``: build a SoundShapes TFDS dataset in ``out_dir/data``;
2. ``ground_truth``: score the built test and compositional clips with the evaluator (each next
   to its shuffled-pair baseline);
3. ``tokenizer_video`` / ``tokenizer_audio``: train MAGVIT-v2 and SoundStream (``out_dir/tokenizer_*``);
4. ``tokens``: token shards of every split (``out_dir/tokens``);
5. ``lm``: train the prefix LM on the task mixture (``out_dir/lm``), then ``lm_eval``: each task's
   validation loss against its unigram baseline;
6. ``generate``: every task prompted on the test and compositional clips, scored by the evaluator
   next to the tokenizers' round trip (the ceiling) and shuffled pairs (chance);
7. ``out_dir/index.html`` (inputs and outputs side by side, with sound) and ``report.json``.

``profile='full'`` is the demo (`make demo`); ``'smoke'`` runs every stage at minimal sizes (tests).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import numpy as np

from videolm import configlib
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


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Sizes and configs of each profile. Config overrides are `--config.` paths (see configlib).
PROFILES = {
    "full": dict(
        resolution=64, num_frames=17, num_train=512, num_validation=64, num_test=32, num_compositional=32,
        video_tokenizer="tokenizer_video.py:demo", video_overrides=(),
        audio_tokenizer="tokenizer_audio.py:demo", audio_overrides=(),
        lm="lm.py:tiny", lm_overrides=("train.time_limit_s=480",),
        tokenize_overrides=("shard_size=512", "batch_size=32"),
        temperature=1.0, top_k=0, guidance=2.0),
    "smoke": dict(
        resolution=32, num_frames=9, num_train=16, num_validation=8, num_test=3, num_compositional=2,
        video_tokenizer="tokenizer_video.py:tiny",
        video_overrides=("model.base_channels=8", "train.num_steps=2", "train.log_every=1",
                         "train.checkpoint_every=2", "train.video_every=0", "loss.perceptual_weight=0.0",
                         "data.batch_size=8", "train.crop_size=0", "train.crop_frames=0",
                         "init.image_stage.num_steps=0"),
        audio_tokenizer="tokenizer_audio.py:tiny",
        audio_overrides=("train.num_steps=2", "train.log_every=1", "train.checkpoint_every=2", "data.batch_size=8"),
        lm="lm.py:tiny",
        lm_overrides=("model.width=32", "model.depth=1", "model.num_heads=2", "model.num_kv_heads=1",
                      "model.mlp_dim=64", "data.batch_size=8", "train.num_steps=2", "train.log_every=1",
                      "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
                      "eval.num_batches=1", "eval.batch_size=8"),
        tokenize_overrides=("shard_size=8", "batch_size=4"),
        temperature=1.0, top_k=0, guidance=2.0),
}


def _world_overrides(kind: str, p: dict) -> tuple[str, ...]:
    size, frames = p["resolution"], p["num_frames"]
    if kind == "video":
        return (f"data.height={size}", f"data.width={size}", f"data.num_frames={frames}")
    return (f"data.world.height={size}", f"data.world.width={size}", f"data.world.num_frames={frames}")


def _config(spec: str, overrides) -> "ml_collections.ConfigDict":  # noqa: F821
    return configlib.load_config(os.path.join(CONFIGS, spec), list(overrides))


def _train_tokenizer(kind: str, config, workdir: str) -> dict:
    if kind == "video":
        from tokenizers.magvit.train import train
    else:
        from tokenizers.soundstream.train import train
    start = time.perf_counter()
    metrics = train(config, workdir)
    return {"workdir": workdir, "train_seconds": time.perf_counter() - start,
            "last": {k: float(v) for k, v in (metrics or {}).items() if np.ndim(v) == 0}}


def _save_outputs(path: str, outputs) -> None:
    arrays = {}
    for i, o in enumerate(outputs):
        arrays[f"video_{i}"] = o.video
        if o.audio is not None:
            arrays[f"audio_{i}"] = o.audio
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def _load_outputs(path: str, count: int) -> list[dict]:
    with np.load(path) as data:
        return [{"video": data[f"video_{i}"], "audio": data[f"audio_{i}"] if f"audio_{i}" in data else None}
                for i in range(count)]


def run_demo(out_dir: str = "demo_out", *, profile: str = "full", num_shown: int = 4, progress: bool = True,
             log=print, **sizes) -> dict:
    """Runs (or resumes) every stage in ``out_dir``; returns the report (also ``out_dir/report.json``).

    ``sizes`` override the profile's entries (``num_train=...``, ``lm_overrides=(...)``, ...).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown demo profile {profile!r}; expected one of {', '.join(PROFILES)}")
    p = dict(PROFILES[profile])
    unknown = set(sizes) - set(p)
    if unknown:
        raise ValueError(f"run_demo: unknown settings {sorted(unknown)}; known: {', '.join(p)}")
    p.update(sizes)
    if num_shown < 1:
        raise ValueError(f"num_shown must be >= 1, got {num_shown}")
    if min(p["num_test"], p["num_compositional"]) < 2:
        raise ValueError("num_test and num_compositional must be >= 2 (the shuffled-pair baseline needs two clips)")
    out_dir = os.path.abspath(out_dir)
    started = time.perf_counter()
    data_dir = os.path.join(out_dir, "data")
    data_settings = {k: p[k] for k in ("resolution", "num_frames", "num_train", "num_validation", "num_test",
                                       "num_compositional")}
    built = _stage(out_dir, "data", data_settings,
                   lambda: build_lib.build("soundshapes", data_dir, progress=progress, **data_settings), log)

    def score_ground_truth():
        result = {}
        for split in SHOWN_SPLITS:
            clips, world = _load_clips(data_dir, split)
            result[split] = {"all": _score(world, clips),
                             "clips": [_score(world, [clip]) for clip in clips[:num_shown]]}
        return result

    truth = _stage(out_dir, "ground_truth", dict(data_settings, num_shown=num_shown), score_ground_truth, log)

    # --- tokenizers
    workdirs = {}
    for kind, spec, extra in (("video", p["video_tokenizer"], p["video_overrides"]),
                              ("audio", p["audio_tokenizer"], p["audio_overrides"])):
        config = _config(spec, _world_overrides(kind, p) + tuple(extra))
        workdirs[kind] = os.path.join(out_dir, f"tokenizer_{kind}")
        _stage(out_dir, f"tokenizer_{kind}", configlib.config_to_dict(config),
               lambda kind=kind, config=config: _train_tokenizer(kind, config, workdirs[kind]), log)

    # --- token shards
    tokens_dir = os.path.join(out_dir, "tokens")
    tok_config = _config("tokenize.py:tiny", (
        f"video_tokenizer_workdir={workdirs['video']}", f"audio_tokenizer_workdir={workdirs['audio']}",
        f"data.data_dir={data_dir}", f"data.world.height={p['resolution']}", f"data.world.width={p['resolution']}",
        f"data.world.num_frames={p['num_frames']}") + tuple(p["tokenize_overrides"]))
    tok_config.data.splits = dict(train=p["num_train"], validation=p["num_validation"])

    def tokenize_all():
        from videolm import tokenize
        start = time.perf_counter()
        summary = tokenize.run(tok_config, tokens_dir)
        return {"splits": summary["splits"], "seconds": time.perf_counter() - start}

    _stage(out_dir, "tokens", dict(configlib.config_to_dict(tok_config), tokenizers=[
        _stage_seconds(out_dir, "tokenizer_video"), _stage_seconds(out_dir, "tokenizer_audio")]), tokenize_all, log)

    # --- the LM on the mixture
    lm_dir = os.path.join(out_dir, "lm")
    lm_config = _config(p["lm"], (f"data.tokens_dir={tokens_dir}",) + tuple(p["lm_overrides"]))

    def train_lm():
        from videolm import train
        start = time.perf_counter()
        train.train(lm_config, lm_dir)
        return {"seconds": time.perf_counter() - start}

    lm_settings = dict(configlib.config_to_dict(lm_config), tokens=_stage_seconds(out_dir, "tokens"))
    lm_run = _stage(out_dir, "lm", lm_settings, train_lm, log)

    def evaluate_lm():
        from videolm import train
        return train.evaluate(lm_config, lm_dir)

    lm_eval = _stage(out_dir, "lm_eval", dict(lm_settings, trained=lm_run), evaluate_lm, log)

    # --- generation, scored
    sampling_settings = dict(temperature=p["temperature"], top_k=p["top_k"], guidance=p["guidance"], seed=0)
    outputs_dir = os.path.join(out_dir, "generated")

    def generate_and_score():
        from videolm import sampling, task_eval
        from videolm.generate import Generator
        generator = Generator.from_workdir(lm_dir)
        cfg = sampling.SamplingConfig(temperature=p["temperature"], top_k=p["top_k"], seed=0)
        task_names = [t for t, w in lm_config.mixture.weights.items() if w > 0]
        result = {}
        for split in SHOWN_SPLITS:
            clips, world = _load_clips(data_dir, split)
            start = time.perf_counter()
            scores, outputs = task_eval.run_tasks(generator, world, clips, task_names, cfg,
                                                  guidance={t: p["guidance"] for t in task_names},
                                                  sound_for=num_shown)
            os.makedirs(os.path.join(outputs_dir, split), exist_ok=True)
            for task, outs in outputs.items():
                _save_outputs(os.path.join(outputs_dir, split, f"{task}.npz"), outs[:num_shown])
            result[split] = {"tasks": scores, "reconstruction": task_eval.reconstruction_scores(generator, world, clips),
                             "seconds": time.perf_counter() - start, "num_clips": len(clips)}
        return result

    generated = _stage(out_dir, "generate", dict(sampling_settings, lm=lm_run, num_shown=num_shown),
                       generate_and_score, log)

    report = {
        "profile": profile, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
        "stage_seconds": {name: _stage_seconds(out_dir, name) for name in (
            "data", "ground_truth", "tokenizer_video", "tokenizer_audio", "tokens", "lm", "lm_eval", "generate")},
        "tokenizers": {kind: _eval_summary(workdirs[kind]) for kind in workdirs},
        "lm_eval": lm_eval,
        "tasks": {split: {task: s["headline"] for task, s in generated[split]["tasks"].items()}
                  for split in SHOWN_SPLITS},
        "reconstruction": {split: _reconstruction_headline(generated[split]["reconstruction"])
                           for split in SHOWN_SPLITS},
        "ground_truth": {split: truth[split]["all"].get("caption", {}).get("exact_match") for split in SHOWN_SPLITS},
        "scores": {split: generated[split] for split in SHOWN_SPLITS},
    }
    index = write_gallery(out_dir, data_dir, built, truth, generated, lm_config, num_shown)
    report["index"] = index
    report["wall_seconds_this_run"] = time.perf_counter() - started
    configlib.write_json(os.path.join(out_dir, "report.json"), jsonable(report))
    log(f"[demo] gallery: {index}")
    return report


def _stage_seconds(out_dir: str, name: str) -> float | None:
    path = os.path.join(out_dir, "stages", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("seconds")


def _eval_summary(workdir: str) -> dict:
    """The tokenizer's training metrics at its last step (from metrics.jsonl)."""
    from videolm import runlog
    rows = runlog.read_metrics(workdir, "train")
    return {k: v for k, v in rows[-1].items() if k != "split"} if rows else {}


def _reconstruction_headline(scores: dict) -> dict:
    return {"caption exact match": scores.get("caption", {}).get("exact_match"),
            "colour & shape kept": scores.get("colour_shape", {}).get("colour_shape_kept"),
            "motion accuracy": scores.get("caption", {}).get("motion"),
            "pitch accuracy": scores.get("audio_reference", {}).get("pitch_accuracy"),
            "onset F1": scores.get("audio_reference", {}).get("onset_f1"),
            "psnr": scores.get("psnr")}


def _task_inputs_cells(task: str, clip: dict, world) -> list:
    """The prompt's media as gallery cells (the caption goes under the generated output)."""
    from videolm import task_eval
    inputs = task_eval.prompt_inputs(task, clip)
    cells = []
    if inputs.image is not None:
        cells.append(gallery_lib.Cell("input image", image=inputs.image))
    if inputs.video is not None:
        with_sound = task == "av_continuation"
        cells.append(gallery_lib.Cell("structure video" if task == "stylize" else "input video", video=inputs.video,
                                      fps=world.fps, audio=inputs.audio if with_sound else None,
                                      sample_rate=world.sample_rate))
    if inputs.audio is not None and task != "av_continuation":
        cells.append(gallery_lib.Cell("input audio", audio=inputs.audio, sample_rate=world.sample_rate))
    return cells


def write_gallery(out_dir, data_dir, built, truth, generated, lm_config, num_shown) -> str:
    from videolm import task_eval, tasks
    gallery = gallery_lib.Gallery(
        out_dir, "videolm demo: VideoPoet on SoundShapes",
        f"Everything here was trained from nothing on this machine: a SoundShapes dataset "
        f"({built['config']}, splits {built['split_sizes']}), a MAGVIT-v2 video tokenizer, a SoundStream audio "
        "tokenizer and one prefix LM trained on the task mixture. Each task is prompted with a held-out "
        "clip's caption / first frame / video / sound and its output is scored by the SoundShapes "
        "evaluator from pixels and samples alone; 'reconstruction' is the tokenizers' round trip (the "
        "ceiling), 'shuffled' pairs each output with another clip's reference (chance).")
    for split in SHOWN_SPLITS:
        clips, world = _load_clips(data_dir, split, num_shown)
        rows = {}
        for task, scores in generated[split]["tasks"].items():
            h = scores["headline"]
            rows[task] = {h["name"]: h["value"], "shuffled": h["shuffled"]}
        gallery.add_section(f"Generated: {split} split", "Colour x shape x motion combinations never seen in "
                            "training." if split == "compositional" else "Held-out clips of the training distribution.")
        gallery.add_table(f"Headline score of each task ({generated[split]['num_clips']} clips)",
                          {"tasks": {t: f"{gallery_lib.format_value(r[next(iter(r))])} ({next(iter(r))}; shuffled "
                                        f"{gallery_lib.format_value(r['shuffled'])})" for t, r in rows.items()},
                           "reconstruction": _reconstruction_headline(generated[split]["reconstruction"])})
        for task in generated[split]["tasks"]:
            path = os.path.join(out_dir, "generated", split, f"{task}.npz")
            outs = _load_outputs(path, min(num_shown, len(clips)))
            is_image = tasks.get_task(task).output == "image"
            for i, (clip, out) in enumerate(zip(clips, outs)):
                prompt = task_eval.prompt_inputs(task, clip).caption
                text = f"prompt: {prompt}" if prompt else None
                generated_cell = (gallery_lib.Cell("generated image", image=out["video"][0], text=text) if is_image else
                                  gallery_lib.Cell("generated", video=out["video"], audio=out["audio"], fps=world.fps,
                                                   sample_rate=world.sample_rate, text=text))
                gallery.add_row(f"{split} / {task} #{clip['index']}",
                                _task_inputs_cells(task, clip, world) + [generated_cell, gallery_lib.Cell(
                                    "reference clip", video=clip["video"], audio=clip["audio"], fps=world.fps,
                                    sample_rate=world.sample_rate, text=clip["caption"])])
        gallery.add_table(f"Evaluator on all {truth[split]['all']['num_clips']} ground-truth {split} clips",
                          summary_columns(truth[split]["all"]))
    return gallery.write()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", "--out-dir", dest="out_dir", default="demo_out",
                        help="where the data, models, stages, gallery and report go")
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES),
                        help="'full': the demo; 'smoke': every stage at minimal sizes")
    parser.add_argument("--num-shown", type=int, default=4, help="clips per split and task shown in the gallery")
    return parser


def run(args: argparse.Namespace) -> dict:
    report = run_demo(args.out_dir, profile=args.profile, num_shown=args.num_shown)
    print(json.dumps({"index": report["index"], "tasks": report["tasks"]}, default=float))
    return report


def main(argv=None) -> dict:
    return run(add_arguments(argparse.ArgumentParser(prog="videolm demo")).parse_args(argv))


if __name__ == "__main__":
    main()
