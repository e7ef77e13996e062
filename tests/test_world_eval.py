"""The SoundShapes evaluator: ground truth scores right, corrupted clips score wrong."""
import dataclasses
import json

import numpy as np
import pytest

from videolm.data import soundshapes as ss
from videolm.eval import audio as audio_eval
from videolm.eval import evaluate_world, metrics, world

CONFIG = ss.WorldConfig()
BOUNCY = dataclasses.replace(CONFIG, motions=('bounce', 'still', 'left'))
STRAIGHT = ('left', 'right', 'up', 'down', 'up-left', 'up-right', 'down-left', 'down-right')


@pytest.fixture(scope='module')
def ground_truth():
    return evaluate_world.evaluate_ground_truth(CONFIG, 'test', num_clips=40, seed=0)


@pytest.fixture(scope='module')
def clips():
    return [ss.generate_clip(CONFIG, 'test', i) for i in range(24)]


@pytest.fixture(scope='module')
def bouncy():
    """Clips with wall bounces, hence clicks, plus their ground-truth scores."""
    clips = [ss.generate_clip(BOUNCY, 'test', i) for i in range(16)]
    clips = [c for c in clips if any(c['bounce_times'])]
    assert len(clips) >= 6
    scores = metrics.score_clips(BOUNCY, videos=[c['video'] for c in clips],
                                 audios=[c['audio'] for c in clips])
    return clips, scores


def test_ground_truth_reads_back_exactly(ground_truth):
    caption = ground_truth['caption']
    assert caption['exact_match'] >= 0.99
    assert min(caption[k] for k in ('color', 'shape', 'motion', 'count')) >= 0.99
    assert ground_truth['trajectory_error_px'] < 0.5
    sound = ground_truth['audio_video']
    assert sound['pitch_accuracy'] >= 0.99 and sound['pitch_error_cents'] < 10
    assert sound['tone_count_accuracy'] >= 0.99
    assert ground_truth['audio_reference']['pitch_accuracy'] >= 0.99
    assert ground_truth['audio']['tonal_ratio'] > 0.95
    temporal = ground_truth['temporal']
    assert temporal['color_switch_rate'] == 0 and temporal['background_flicker'] == 0
    assert temporal['area_cv'] < 0.1
    json.dumps(ground_truth, allow_nan=False)


def test_shuffled_pairs_score_far_below_true_pairs(ground_truth):
    assert ground_truth['caption']['shuffled']['exact_match'] < 0.3
    assert ground_truth['audio_video']['shuffled']['pitch_accuracy'] < 0.5
    assert ground_truth['audio_video']['shuffled']['tone_count_accuracy'] < 0.9


@pytest.mark.parametrize('config, split', [
    (CONFIG, 'compositional'),
    (ss.WorldConfig(height=128, width=128), 'validation'),
])
def test_other_splits_and_resolutions(config, split):
    result = evaluate_world.evaluate_ground_truth(config, split, num_clips=12, seed=5)
    assert result['caption']['exact_match'] >= 0.99
    assert result['audio_video']['pitch_accuracy'] >= 0.99


def test_caption_from_analysis(clips):
    for clip in clips[:8]:
        analysis = world.analyze_video(clip['video'], CONFIG)
        assert sorted(ss.parse_caption(world.caption_from_analysis(analysis))) == sorted(
            ss.parse_caption(clip['caption']))


def test_bounces_and_clicks_line_up(bouncy):
    clips, scores = bouncy
    sound = scores['audio_video']
    assert sound['onset_f1'] >= 0.99
    assert abs(sound['av_lag_ms']) < 15 and sound['av_abs_lag_ms'] < 25
    assert sound['shuffled']['onset_f1'] < 0.5


# ----------------------------------------------------------------------------- corruptions


def _score_captions(videos, clips):
    return metrics.score_clips(CONFIG, videos=videos, captions=[c['caption'] for c in clips])


def test_wrong_direction_is_wrong(clips):
    moving = [c for c in clips if any(m in STRAIGHT for m in c['motions'])]
    reversed_time = _score_captions([c['video'][::-1] for c in moving], moving)
    assert reversed_time['caption']['exact_match'] == 0
    sideways = [c for c in moving if any(ss.DIRECTIONS[m][1] for m in c['motions'] if m in STRAIGHT)]
    mirrored = _score_captions([c['video'][:, :, ::-1] for c in sideways], sideways)
    assert mirrored['caption']['exact_match'] == 0
    assert mirrored['caption']['color'] == 1 and mirrored['caption']['motion'] < 0.8


def test_wrong_colour_is_wrong(clips):
    videos = []
    for clip in clips:
        spare = [c for c in CONFIG.colors if c not in clip['colors']]
        video = clip['video'].copy()
        for k, mask in enumerate(clip['masks']):
            video[mask] = ss.COLORS[spare[k]]
        videos.append(video)
    scores = _score_captions(videos, clips)
    assert scores['caption']['exact_match'] == 0 and scores['caption']['color'] == 0
    assert scores['caption']['shape'] >= 0.99 and scores['caption']['motion'] >= 0.99


def test_audio_delayed_250ms_is_wrong(bouncy):
    clips, truth = bouncy
    delay = int(0.25 * BOUNCY.sample_rate)
    late = [np.concatenate([np.zeros(delay, np.float32), c['audio'][:-delay]]) for c in clips]
    scores = metrics.score_clips(BOUNCY, videos=[c['video'] for c in clips], audios=late)
    assert truth['audio_video']['onset_f1'] >= 0.99
    assert scores['audio_video']['onset_f1'] < 0.2
    assert scores['audio_video']['av_lag_ms'] == pytest.approx(250, abs=20)


def test_audio_from_another_clip_is_wrong(clips):
    videos = [c['video'] for c in clips]
    audios = [c['audio'] for c in clips]
    other = audios[1:] + audios[:1]
    truth = metrics.score_clips(CONFIG, videos=videos, audios=audios)
    swapped = metrics.score_clips(CONFIG, videos=videos, audios=other)
    assert truth['audio_video']['pitch_accuracy'] >= 0.99
    assert swapped['audio_video']['pitch_accuracy'] < 0.5
    assert swapped['audio_video']['pitch_error_cents'] > 100


def test_heavy_noise_is_wrong(clips, bouncy):
    rng = np.random.default_rng(0)
    subset = clips[:12]

    def noisy_video(video, sigma):
        return np.clip(video + rng.normal(0, sigma, video.shape), 0, 255).astype(np.uint8)

    drowned = _score_captions([noisy_video(c['video'], 100) for c in subset], subset)
    assert drowned['caption']['exact_match'] < 0.2
    grainy = _score_captions([noisy_video(c['video'], 40) for c in subset], subset)
    assert grainy['temporal']['background_flicker'] > 10

    bounce_clips, truth = bouncy
    hissing = [np.clip(c['audio'] + rng.normal(0, 0.5, c['audio'].shape), -1, 1).astype(np.float32)
               for c in bounce_clips]
    scores = metrics.score_clips(BOUNCY, videos=[c['video'] for c in bounce_clips], audios=hissing)
    assert truth['audio']['tonal_ratio'] > 0.95
    assert scores['audio']['tonal_ratio'] < 0.5
    assert scores['audio_video']['onset_f1'] < 0.5


# ----------------------------------------------------------------------------- pieces


def test_psnr_and_ssim_against_closed_forms():
    rng = np.random.default_rng(0)
    image = rng.integers(20, 230, (2, 32, 32, 3)).astype(np.uint8)
    assert metrics.psnr(image, image) == float('inf')
    assert metrics.psnr(image, image + 10) == pytest.approx(20 * np.log10(255 / 10))
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    a, b = 100.0, 140.0   # flat images: only the luminance term is left
    c1 = (0.01 * 255) ** 2
    flat_a, flat_b = np.full((16, 16, 3), a), np.full((16, 16, 3), b)
    assert metrics.ssim(flat_a, flat_b) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    noisy = [np.clip(image + rng.normal(0, s, image.shape), 0, 255) for s in (5, 20, 60)]
    values = [metrics.ssim(image, n) for n in noisy]
    assert values[0] > values[1] > values[2]
    assert metrics.ssim(noisy[1], image) == pytest.approx(metrics.ssim(image, noisy[1]))
    with pytest.raises(ValueError, match='shapes'):
        metrics.psnr(image, image[:1])


def test_motion_classifier_on_synthetic_tracks():
    frames = np.arange(CONFIG.num_frames)[:, None]
    for name in STRAIGHT:
        direction = np.array(ss.DIRECTIONS[name])
        track = 32 + (frames - 8) * 1.5 * direction
        assert world.classify_motion(track, CONFIG) == (name, [])
    jitter = 30 + np.random.default_rng(0).normal(0, 0.5, (CONFIG.num_frames, 2))
    assert world.classify_motion(jitter, CONFIG)[0] == 'still'
    contact = 6.3   # frames: x rises to the wall at 50 then comes back
    x = 50 - 2.0 * np.abs(frames[:, 0] - contact)
    track = np.stack([np.full_like(x, 20.0), x], axis=-1)
    motion, times = world.classify_motion(track, CONFIG)
    assert motion == 'bounce' and times == [pytest.approx(contact / CONFIG.fps, abs=1e-6)]
    gappy = track.copy()
    gappy[[2, 11]] = np.nan   # frames where the object was not seen are interpolated
    assert world.classify_motion(gappy, CONFIG)[0] == 'bounce'


def test_event_matching_and_caption_agreement():
    assert metrics.match_events([1.0, 2.0], [1.02, 2.3, 5.0], 0.05) == [pytest.approx(0.02)]
    assert metrics.match_events([1.0, 1.05], [1.04], 0.1) == [pytest.approx(-0.01)]
    row = metrics.caption_agreement([('red', 'circle', 'left')],
                                    [('red', 'square', 'left'), ('blue', 'circle', 'up')])
    assert row == {'color': 1, 'shape': 0, 'motion': 1, 'objects': 2, 'count': False,
                   'exact': False}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match='64x64'):
        world.analyze_video(np.zeros((17, 32, 32, 3), np.uint8), CONFIG)
    with pytest.raises(ValueError, match='uint8'):
        world.analyze_video(np.zeros((17, 64, 64, 3), np.float32), CONFIG)
    with pytest.raises(ValueError, match='mono'):
        audio_eval.analyze_audio(np.zeros((100, 2), np.float32), CONFIG)
    with pytest.raises(ValueError, match='equal lengths'):
        metrics.score_clips(CONFIG, videos=[np.zeros((17, 64, 64, 3), np.uint8)], captions=[])
    with pytest.raises(ValueError, match='num_clips'):
        evaluate_world.evaluate_ground_truth(CONFIG, 'test', num_clips=1)


def test_through_mp4_the_world_still_reads_back():
    result = evaluate_world.evaluate_ground_truth(CONFIG, 'test', num_clips=8, seed=3,
                                                  through_mp4=True)
    assert 'psnr' not in result   # a clip against itself says nothing
    coded = result['mp4']
    assert coded['psnr'] > 28 and coded['ssim'] > 0.9
    assert coded['trajectory_error_px'] < 1.0
    assert coded['caption']['color'] == 1 and coded['caption']['motion'] == 1
    assert coded['caption']['exact_match'] >= 0.75   # yuv420p halves the chroma of small shapes
    assert coded['audio_reference']['pitch_accuracy'] >= 0.99
    assert coded['audio_video']['pitch_accuracy'] >= 0.9
