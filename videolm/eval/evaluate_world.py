"""The evaluator run on SoundShapes ground truth: how well the world can be read back.

``evaluate_ground_truth`` generates clips, scores them with ``metrics.score_clips`` against their
own captions and annotations, and next to each cross-modal score gives the shuffled-pair baseline.
With ``through_mp4`` the clips also go through H.264/AAC (``videolm.media``) and are scored again,
which is how generated media reaches the evaluator.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

from videolm.data import soundshapes
from videolm.eval import metrics


def evaluate_ground_truth(world_config: soundshapes.WorldConfig, split: str = 'test',
                          num_clips: int = 64, seed: int = 0, through_mp4: bool = False) -> dict:
    """Scores clips ``seed .. seed + num_clips - 1`` of ``split``; returns a JSON-able dict."""
    if num_clips < 2:
        raise ValueError(f'num_clips must be >= 2 (shuffled pairs need two clips), got {num_clips}')
    world_config.validate()
    start = time.perf_counter()
    clips = [soundshapes.generate_clip(world_config, split, seed + i) for i in range(num_clips)]
    generate_seconds = time.perf_counter() - start

    start = time.perf_counter()
    # The references hold the annotations but not the pixels: PSNR/SSIM of a clip against
    # itself says nothing (they are reported for the mp4 round trip).
    annotations = [{k: v for k, v in c.items() if k != 'video'} for c in clips]
    scores = metrics.score_clips(
        world_config, videos=[c['video'] for c in clips], audios=[c['audio'] for c in clips],
        captions=[c['caption'] for c in clips], references=annotations, shuffle_seed=seed)
    evaluate_seconds = time.perf_counter() - start
    result = {
        'split': split, 'seed': seed,
        'resolution': [world_config.num_frames, world_config.height, world_config.width],
        **scores,
        'generate_clips_per_s': num_clips / generate_seconds,
        'evaluate_clips_per_s': num_clips / evaluate_seconds,
    }
    if through_mp4:
        result['mp4'] = _score_through_mp4(world_config, clips, seed)
    return jsonable(result)


def _score_through_mp4(world_config, clips, seed) -> dict:
    from videolm import media  # media pulls in the codecs; only needed here

    videos, audios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, clip in enumerate(clips):
            path = os.path.join(tmp, f'{i}.mp4')
            media.write_mp4(path, clip['video'], world_config.fps, audio=clip['audio'],
                            sample_rate=world_config.sample_rate)
            decoded = media.read_video(path)
            videos.append(decoded.video[:world_config.num_frames])
            audios.append(media.fit_length(decoded.audio, world_config.num_samples))
    return metrics.score_clips(world_config, videos=videos, audios=audios,
                               captions=[c['caption'] for c in clips], references=clips,
                               shuffle_seed=seed)


def jsonable(value):
    """Turns numpy scalars into Python numbers and non-finite floats into None, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
