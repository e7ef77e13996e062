"""Scores for SoundShapes media: fidelity (PSNR, SSIM), caption agreement, trajectories, temporal
consistency, pitch, onsets and audio-video lag.

``score_clips`` is the entry point: it analyses each clip's pixels and samples (never its
annotations) and scores them against whatever references are given. Every cross-modal score
(caption <-> video, video <-> audio) is reported next to the same score on shuffled pairs (clip i's
video with clip j's caption or audio), the level a model reaches by ignoring the pairing.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize

from videolm.data import soundshapes
from videolm.eval import audio as audio_eval
from videolm.eval import world

ATTRIBUTES = ('color', 'shape', 'motion')
PITCH_TOLERANCE_CENTS = 50.0
ONSET_TOLERANCE_SECONDS = 0.05
LAG_WINDOW_SECONDS = 0.5
_MISSING_CENTS = 1200.0


# ----------------------------------------------------------------------------- fidelity


def psnr(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf when a == b)."""
    a, b = _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    return float('inf') if mse == 0 else float(10 * np.log10(max_value ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = 255.0, sigma: float = 1.5) -> float:
    """Mean structural similarity of images [..., H, W, C] (Gaussian window sigma 1.5, 11 taps,
    K1 = 0.01, K2 = 0.03), per channel, averaged over the map without its 5-pixel border."""
    a, b = _same_shape(a, b)
    if a.ndim < 3:
        raise ValueError(f'ssim expects [..., H, W, C] arrays, got shape {a.shape}')
    sigmas = (0,) * (a.ndim - 3) + (sigma, sigma, 0)

    def blur(x):
        return ndimage.gaussian_filter(x, sigmas, truncate=3.5, mode='reflect')

    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    border = int(3.5 * sigma + 0.5)
    height, width = a.shape[-3:-1]
    if height > 2 * border and width > 2 * border:
        index = index[..., border:height - border, border:width - border, :]
    return float(index.mean())


def _same_shape(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f'arrays to compare have different shapes {a.shape} and {b.shape}')
    return a, b


# ----------------------------------------------------------------------------- captions


def match_objects(predicted, reference) -> list[tuple[int, int]]:
    """Pairs (i, j) of predicted and reference (color, shape, motion) objects, maximising the number
    of agreeing attributes (Hungarian)."""
    if not predicted or not reference:
        return []
    agree = np.array([[sum(p == r for p, r in zip(pred, ref)) for ref in reference]
                      for pred in predicted], np.float64)
    rows, cols = optimize.linear_sum_assignment(-agree)
    return list(zip(rows.tolist(), cols.tolist()))


def caption_agreement(predicted, reference) -> dict:
    """Per clip: attribute hits over the reference objects, whether the counts agree, exact match."""
    hits = {name: 0 for name in ATTRIBUTES}
    for i, j in match_objects(predicted, reference):
        for a, name in enumerate(ATTRIBUTES):
            hits[name] += predicted[i][a] == reference[j][a]
    return {**hits, 'objects': len(reference), 'count': len(predicted) == len(reference),
            'exact': sorted(map(tuple, predicted)) == sorted(map(tuple, reference))}


def _aggregate_captions(rows: list[dict]) -> dict:
    objects = max(1, sum(r['objects'] for r in rows))
    out = {'exact_match': float(np.mean([r['exact'] for r in rows]))}
    out.update({name: sum(r[name] for r in rows) / objects for name in ATTRIBUTES})
    out['count'] = float(np.mean([r['count'] for r in rows]))
    return out


# ----------------------------------------------------------------------------- video


def trajectory_errors(analysis: world.VideoAnalysis, reference_attributes, reference_centroids):
    """Per matched object, the mean distance (px) between recovered and reference centroids over
    the frames where the object is seen."""
    errors = []
    for i, j in match_objects(analysis.attributes, reference_attributes):
        track = analysis.objects[i].centroids
        seen = np.isfinite(track[:, 0])
        if seen.any():
            gap = np.linalg.norm(track[seen] - np.asarray(reference_centroids[j])[seen], axis=-1)
            errors.append(float(gap.mean()))
    return errors


def temporal_consistency(analysis: world.VideoAnalysis, video: np.ndarray) -> dict:
    """area_cv: mean over objects of std/mean of the mask area; color_switch_rate: fraction of
    consecutive frames whose set of visible colours changes; background_flicker: mean absolute
    change (0-255) between consecutive frames of the pixels at least 2 px away from every object."""
    areas = [o.areas[o.present].astype(np.float64) for o in analysis.objects]
    area_cv = float(np.mean([a.std() / a.mean() for a in areas])) if areas else 0.0
    sets = analysis.colors_per_frame
    switches = float(np.mean([x != y for x, y in zip(sets[:-1], sets[1:])])) if len(sets) > 1 else 0.0
    grown = ndimage.binary_dilation(analysis.object_mask, np.ones((1, 5, 5), bool))
    still = ~grown[1:] & ~grown[:-1]
    change = np.abs(np.diff(video.astype(np.float32), axis=0)).mean(-1)
    flicker = float(change[still].mean()) if still.any() else 0.0
    return {'area_cv': area_cv, 'color_switch_rate': switches, 'background_flicker': flicker}


# ----------------------------------------------------------------------------- audio <-> video


def expected_pitch_hz(analysis: world.VideoAnalysis, config: soundshapes.WorldConfig) -> np.ndarray:
    """float [N, T] the tone each recovered object should sound, from its shape and height."""
    if not analysis.objects:
        return np.zeros((0, config.num_frames))
    return np.stack([soundshapes.shape_pitch_hz(config, o.shape, o.centers[:, 0])
                     for o in analysis.objects])


def pitch_errors_cents(expected_hz: np.ndarray, pitches_hz: np.ndarray) -> np.ndarray:
    """|cents| from each expected tone [N, T] to the nearest detected tone [T, K] of its frame;
    1200 where nothing was detected, NaN where nothing is expected."""
    expected_hz = np.asarray(expected_hz, np.float64)
    out = np.full(expected_hz.shape, np.nan)
    for n, t in zip(*np.nonzero(np.isfinite(expected_hz))):
        found = pitches_hz[t][np.isfinite(pitches_hz[t])] if t < len(pitches_hz) else []
        out[n, t] = (np.min(np.abs(1200 * np.log2(found / expected_hz[n, t]))) if len(found)
                     else _MISSING_CENTS)
    return out


def match_events(reference, detected, window: float):
    """Greedy one-to-one matching of event times, closest first, within +-window seconds.
    Returns the list of (detected - reference) offsets of matched pairs."""
    pairs = sorted((abs(d - r), i, j) for i, r in enumerate(reference) for j, d in enumerate(detected)
                   if abs(d - r) <= window)
    used_r, used_d, offsets = set(), set(), []
    for _, i, j in pairs:
        if i not in used_r and j not in used_d:
            used_r.add(i)
            used_d.add(j)
            offsets.append(detected[j] - reference[i])
    return offsets


def audio_video_agreement(analysis: world.VideoAnalysis, sound: audio_eval.AudioAnalysis,
                          config: soundshapes.WorldConfig) -> dict:
    """Per clip counts: does the soundtrack sound the objects the video shows, bounce for bounce?"""
    cents = pitch_errors_cents(expected_pitch_hz(analysis, config), sound.pitches_hz)
    cents = cents[np.isfinite(cents)]
    frames = min(len(analysis.colors_per_frame), len(sound.num_tones))
    visible = np.array([len(s) for s in analysis.colors_per_frame[:frames]])
    bounces = sorted(t for o in analysis.objects for t in o.bounce_times)
    onsets = list(sound.onsets)
    hits = len(match_events(bounces, onsets, ONSET_TOLERANCE_SECONDS))
    return {'cents': cents, 'tone_count_hits': int(np.sum(sound.num_tones[:frames] == visible)),
            'frames': frames, 'onset_tp': hits, 'onset_fp': len(onsets) - hits,
            'onset_fn': len(bounces) - hits,
            'lags': match_events(bounces, onsets, LAG_WINDOW_SECONDS)}


def _aggregate_audio_video(rows: list[dict]) -> dict:
    cents = np.concatenate([r['cents'] for r in rows]) if rows else np.zeros(0)
    tp, fp, fn = (sum(r[k] for r in rows) for k in ('onset_tp', 'onset_fp', 'onset_fn'))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    lags = np.array([lag for r in rows for lag in r['lags']])
    return {
        'pitch_accuracy': float(np.mean(cents <= PITCH_TOLERANCE_CENTS)) if cents.size else None,
        'pitch_error_cents': float(np.median(cents)) if cents.size else None,
        'tone_count_accuracy': sum(r['tone_count_hits'] for r in rows) / max(1, sum(
            r['frames'] for r in rows)),
        'onset_precision': precision, 'onset_recall': recall,
        'onset_f1': 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        'av_lag_ms': float(1000 * np.median(lags)) if lags.size else None,
        'av_abs_lag_ms': float(1000 * np.median(np.abs(lags))) if lags.size else None,
        'av_lag_pairs': int(lags.size),
    }


def _audio_reference_scores(sound: audio_eval.AudioAnalysis, reference: dict) -> dict:
    cents = pitch_errors_cents(reference['pitch_hz'], sound.pitches_hz)
    bounces = sorted(t for ts in reference['bounce_times'] for t in ts)
    hits = len(match_events(bounces, list(sound.onsets), ONSET_TOLERANCE_SECONDS))
    return {'cents': cents[np.isfinite(cents)], 'tone_count_hits': 0, 'frames': 0,
            'onset_tp': hits, 'onset_fp': len(sound.onsets) - hits, 'onset_fn': len(bounces) - hits,
            'lags': match_events(bounces, list(sound.onsets), LAG_WINDOW_SECONDS)}


# ----------------------------------------------------------------------------- everything


def shuffled_pairs(n: int, seed: int = 0) -> list[int]:
    """The shuffled-pair baseline's partner of each of n clips: a fixed derangement (a cyclic shift)."""
    shift = 1 + int(np.random.default_rng(seed).integers(n - 1)) if n > 1 else 0
    return [(i + shift) % n for i in range(n)]


def score_clips(config: soundshapes.WorldConfig, videos=None, audios=None, captions=None,
                references=None, shuffle_seed: int = 0) -> dict:
    """Scores n clips. Any of videos (uint8 [T, H, W, 3] each), audios (float [S] each), captions
    (str each) may be given; references (dicts like ``generate_clip``'s output) add the scores
    against them: 'video' -> PSNR/SSIM, 'centroids' + caption attributes -> trajectory error,
    'pitch_hz' + 'bounce_times' -> audio against the reference annotations.

    Returns a JSON-able dict. Cross-modal scores have a 'shuffled' entry: the same score with each
    clip's video paired with another clip's caption or audio (a fixed derangement from shuffle_seed).
    """
    given = [x for x in (videos, audios, captions, references) if x is not None]
    if not given:
        raise ValueError('score_clips needs at least one of videos, audios, captions, references')
    n = len(given[0])
    if any(len(x) != n for x in given):
        raise ValueError(f'score_clips: videos/audios/captions/references must have equal '
                         f'lengths, got {[len(x) for x in given]}')
    config.validate()
    shuffled = shuffled_pairs(n, shuffle_seed)
    out: dict = {'num_clips': n}

    seen = [world.analyze_video(v, config) for v in videos] if videos is not None else None
    heard = ([audio_eval.analyze_audio(a, config) for a in audios] if audios is not None
             else None)
    said = [soundshapes.parse_caption(c) for c in captions] if captions is not None else None

    if seen is not None and said is not None:
        out['caption'] = _aggregate_captions(
            [caption_agreement(s.attributes, said[i]) for i, s in enumerate(seen)])
        if n > 1:
            out['caption']['shuffled'] = _aggregate_captions(
                [caption_agreement(s.attributes, said[shuffled[i]]) for i, s in enumerate(seen)])
    if seen is not None:
        rows = [temporal_consistency(s, v) for s, v in zip(seen, videos)]
        out['temporal'] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        out['objects_per_clip'] = float(np.mean([len(s.objects) for s in seen]))
    if heard is not None:
        out['audio'] = {'tonal_ratio': float(np.mean([h.tonal_ratio for h in heard])),
                        'onsets_per_clip': float(np.mean([len(h.onsets) for h in heard]))}
    if seen is not None and heard is not None:
        out['audio_video'] = _aggregate_audio_video(
            [audio_video_agreement(s, heard[i], config) for i, s in enumerate(seen)])
        if n > 1:
            out['audio_video']['shuffled'] = _aggregate_audio_video(
                [audio_video_agreement(s, heard[shuffled[i]], config) for i, s in enumerate(seen)])
    if references is not None:
        if seen is not None and all('centroids' in r for r in references):
            errors = [e for s, r in zip(seen, references) for e in trajectory_errors(
                s, list(zip(r['colors'], r['shapes'], r['motions'])), r['centroids'])]
            out['trajectory_error_px'] = float(np.mean(errors)) if errors else None
        if heard is not None and all('pitch_hz' in r for r in references):
            scores = _aggregate_audio_video(
                [_audio_reference_scores(h, r) for h, r in zip(heard, references)])
            out['audio_reference'] = {k: scores[k] for k in (
                'pitch_accuracy', 'pitch_error_cents', 'onset_f1', 'av_lag_ms')}
        if videos is not None and all('video' in r for r in references):
            out['psnr'] = _finite_mean([psnr(v, r['video']) for v, r in zip(videos, references)])
            out['ssim'] = float(np.mean([ssim(v, r['video']) for v, r in zip(videos, references)]))
    return out


def _finite_mean(values):
    """Mean of the finite values (identical pairs give inf PSNR); None when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None
