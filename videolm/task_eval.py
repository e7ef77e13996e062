"""Every task of the mixture prompted on SoundShapes clips and scored by the evaluator.

For each reference clip the prompt takes what the task reads from the clip (its caption, first
frame, video, audio, control video, masked video), the LM generates, and the evaluator scores the
output from its pixels and samples against the clip's annotations (``videolm/eval/metrics.py``).
The headline score of each task:

    t2v, stylize, future, inpaint, outpaint, av_continuation   caption exact match of the video
    t2i, i2v                                                     colour and shape kept (both right)
    a2v                                                          motion accuracy of the video
    v2a                                                          pitch accuracy (within 50 cents)
    unconditional                                                clips the evaluator parses

Every cross-modal score comes with its shuffled-pair baseline (the output scored against another
clip's reference), and ``reconstruction`` scores the tokenizers' round trip of the same clips: the
ceiling any generated output can reach.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from videolm import tasks
from videolm.eval import metrics
from videolm.generate import Generator, Inputs

# Which part of the reference clip each task reads.
_INPUTS = {
    "unconditional": (),
    "t2v": ("caption",),
    "t2i": ("caption",),
    "i2v": ("caption", "image"),
    "future": ("video",),
    "inpaint": ("caption", "video"),
    "outpaint": ("caption", "video"),
    "stylize": ("caption", "control"),
    "a2v": ("audio",),
    "v2a": ("video",),
    "av_continuation": ("video", "audio"),
}


def prompt_inputs(task: str, clip: dict) -> Inputs:
    fields = _INPUTS[task]
    return Inputs(caption=clip["caption"] if "caption" in fields else None,
                  image=clip["video"][0] if "image" in fields else None,
                  video=(clip["control"] if "control" in fields else clip["video"] if "video" in fields else None),
                  audio=clip["audio"] if "audio" in fields else None)


def reference(clip: dict) -> dict:
    """What the evaluator compares against: the annotations and the clip's video."""
    return {k: v for k, v in clip.items() if k not in ("control",)}


def _score(world, clips, videos=None, audios=None, with_caption=True, seed=0) -> dict:
    return metrics.score_clips(world, videos=videos, audios=audios,
                               captions=[c["caption"] for c in clips] if with_caption and videos is not None else None,
                               references=[reference(c) for c in clips], shuffle_seed=seed)


def _colour_shape(world, clips, frames) -> dict:
    """Fraction of clips whose recovered objects have the reference's colours and shapes (a still
    image scored as a clip that does not move), with the shuffled-pair baseline."""
    from videolm.data.soundshapes import parse_caption
    from videolm.eval import world as world_eval

    def kept(analysis, clip):
        said = parse_caption(clip["caption"])
        seen = sorted((o.color, o.shape) for o in analysis.objects)
        want = sorted((color, shape) for color, shape, _ in said)
        return float(seen == want)

    analyses = [world_eval.analyze_video(f, world) for f in frames]
    out = {"colour_shape_kept": float(np.mean([kept(a, c) for a, c in zip(analyses, clips)]))}
    if len(clips) > 1:
        pairs = metrics.shuffled_pairs(len(clips), seed=0)
        out["shuffled"] = float(np.mean([kept(a, clips[pairs[i]]) for i, a in enumerate(analyses)]))
    return out


def headline(task: str, scores: dict) -> tuple[str, float | None, float | None]:
    """(name, value, shuffled-pair baseline) of a task's headline score."""
    caption = scores.get("caption", {})
    if task in ("t2i", "i2v"):
        cs = scores.get("colour_shape", {})
        return "colour & shape kept", cs.get("colour_shape_kept"), cs.get("shuffled")
    if task == "a2v":
        return "motion accuracy", caption.get("motion"), caption.get("shuffled", {}).get("motion")
    if task == "v2a":
        ref = scores.get("audio_reference", {})
        return "pitch accuracy", ref.get("pitch_accuracy"), scores.get("audio_video", {}).get("shuffled", {}).get(
            "pitch_accuracy")
    if task == "unconditional":
        return "objects per clip", scores.get("objects_per_clip"), None
    return "caption exact match", caption.get("exact_match"), caption.get("shuffled", {}).get("exact_match")


def score_task(task: str, world, clips: list[dict], outputs) -> dict:
    """Evaluator scores of one task's outputs against their reference clips."""
    videos = [o.video for o in outputs]
    audios = [o.audio for o in outputs] if all(o.audio is not None for o in outputs) else None
    if task == "t2i":
        stills = [np.repeat(o.video[:1], world.num_frames, axis=0) for o in outputs]
        scores = {"colour_shape": _colour_shape(world, clips, stills)}
    elif task == "v2a":
        scores = _score(world, clips, videos=[c["video"] for c in clips], audios=audios, with_caption=False)
    elif task == "unconditional":
        scores = metrics.score_clips(world, videos=videos, audios=audios)
    else:
        scores = _score(world, clips, videos=videos, audios=audios)
        if task == "i2v":
            scores["colour_shape"] = _colour_shape(world, clips, videos)
    name, value, baseline = headline(task, scores)
    scores["headline"] = {"name": name, "value": value, "shuffled": baseline}
    return scores


def reconstruction_scores(generator: Generator, world, clips: list[dict]) -> dict:
    """The tokenizers' round trip of the clips, scored like a generated output (the ceiling)."""
    videos = [generator.video_tokenizer.decode(generator.video_tokenizer.encode(c["video"])) for c in clips]
    audios = [generator.audio_tokenizer.decode(generator.audio_tokenizer.encode(c["audio"])) for c in clips]
    scores = _score(world, clips, videos=videos, audios=audios)
    scores["colour_shape"] = _colour_shape(world, clips, videos)
    return scores


def run_tasks(generator: Generator, world, clips: list[dict], task_names, sampling_config, *,
              guidance: dict[str, float] | None = None, sound_for: int | None = None) -> tuple[dict, dict]:
    """(scores by task, outputs by task) of every task prompted on every clip.

    Video outputs without generated sound get the video-to-audio task's sound: all of them, or
    the first ``sound_for`` (those shown) when given.
    """
    scores, outputs = {}, {}
    for task in task_names:
        tasks.get_task(task)
        cfg = dataclasses.replace(sampling_config, guidance_scale=(guidance or {}).get(task, 1.0)
                                  if tasks.get_task(task).has_text else 1.0)
        outs = generator.generate(task, [prompt_inputs(task, c) for c in clips], sampling_config=cfg,
                                  add_audio=sound_for is None)
        if sound_for:
            generator.add_sound(outs[:sound_for], sampling_config)
        outputs[task] = outs
        scores[task] = score_task(task, world, clips, outs)
    return scores, outputs
