"""SoundShapes generator: determinism, annotations agree with pixels and samples, splits, errors."""
import dataclasses

import numpy as np
import pytest

from videolm.data import soundshapes as ss

CONFIG = ss.WorldConfig()
NUM_CLIPS = 40


@pytest.fixture(scope='module')
def clips():
    return [ss.generate_clip(CONFIG, 'train', i) for i in range(NUM_CLIPS)]


def _objects(clip):
    return list(zip(clip['colors'], clip['shapes'], clip['motions']))


def test_defaults_match_videopoet_clip():
    CONFIG.validate()
    assert CONFIG.num_samples == 34000
    assert len(ss.SHAPES) >= 3 and len(ss.COLORS) >= 6
    assert {'left', 'right', 'up', 'down', 'up-left', 'up-right', 'down-left', 'down-right',
            'bounce', 'still'} <= set(ss.MOTIONS)
    palette = np.array(list(ss.COLORS.values()), float)
    gaps = np.linalg.norm(palette[:, None] - palette[None], axis=-1) + 1e9 * np.eye(len(palette))
    assert gaps.min() > 90  # well separated


@pytest.mark.parametrize('field, value', [
    ('fps', 0.0), ('shapes', ('circle', 'hexagon')), ('object_size', (0.2, 1.5)),
    ('colors', ('red', 'mauve')), ('motions', ('sideways',)), ('height', 0),
    ('speeds', (0.9,)), ('num_frames', 5), ('max_objects', 9), ('backgrounds', ('stars',)),
    ('sample_rate', 1000),
])
def test_invalid_settings_raise_naming_the_field(field, value):
    config = dataclasses.replace(CONFIG, **{field: value})
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        ss.generate_clip(config, 'train', 0)


def test_lists_from_configs_are_accepted():
    config = ss.WorldConfig(shapes=['circle', 'square'], speeds=[0.2], object_size=[0.2, 0.25])
    assert config.shapes == ('circle', 'square') and hash(config)
    assert ss.generate_clip(config, 'train', 0)['shapes'][0] in ('circle', 'square')


def test_bad_split_and_index_raise():
    with pytest.raises(ValueError, match='split'):
        ss.generate_clip(CONFIG, 'holdout', 0)
    with pytest.raises(ValueError, match='index'):
        ss.generate_clip(CONFIG, 'train', -1)


def test_deterministic_in_config_split_index(clips):
    again = ss.generate_clip(CONFIG, 'train', 3)
    for key, value in clips[3].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, again[key], err_msg=key)
        else:
            assert value == again[key], key
    assert not np.array_equal(clips[3]['video'], clips[4]['video'])
    assert not np.array_equal(clips[3]['video'], ss.generate_clip(CONFIG, 'test', 3)['video'])
    other_seed = ss.generate_clip(dataclasses.replace(CONFIG, seed=1), 'train', 3)
    assert not np.array_equal(clips[3]['audio'], other_seed['audio'])


def test_shapes_and_dtypes(clips):
    t, h, w = CONFIG.num_frames, CONFIG.height, CONFIG.width
    for clip in clips:
        n = len(clip['shapes'])
        assert CONFIG.min_objects <= n <= CONFIG.max_objects
        assert clip['video'].shape == (t, h, w, 3) and clip['video'].dtype == np.uint8
        assert clip['control'].shape == (t, h, w, 3) and clip['control'].dtype == np.uint8
        assert clip['audio'].shape == (CONFIG.num_samples,) and clip['audio'].dtype == np.float32
        assert np.abs(clip['audio']).max() <= 1.0
        assert clip['centroids'].shape == (n, t, 2) and clip['boxes'].shape == (n, t, 4)
        assert clip['masks'].shape == (n, t, h, w) and clip['masks'].dtype == bool
        assert clip['pitch_hz'].shape == (n, t)
        assert len(clip['bounce_frames']) == n and len(clip['bounce_times']) == n


def test_annotations_agree_with_pixels(clips):
    for clip in clips:
        masks = clip['masks']
        assert not np.any(masks.sum(0) > 1), 'objects overlap'
        assert masks.sum(axis=(2, 3)).min() > 0, 'an object vanished'
        for k, color in enumerate(clip['colors']):
            np.testing.assert_array_equal(clip['video'][masks[k]], np.broadcast_to(
                ss.COLORS[color], (masks[k].sum(), 3)))
            ys, xs = np.nonzero(masks[k][0])
            np.testing.assert_allclose(clip['centroids'][k, 0], [ys.mean(), xs.mean()], atol=1e-4)
            assert clip['boxes'][k, 0].tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        background = ~masks.any(0)
        chroma = clip['video'].max(-1).astype(int) - clip['video'].min(-1)
        assert chroma[background].max() <= 16 and chroma[~background].min() >= 140
        # Control: grey only, dark background, objects bright.
        control = clip['control']
        assert np.all(control[..., 0] == control[..., 1]) and np.all(control[..., 1] == control[..., 2])
        assert np.all(control[background] == 0) and np.all(control[~background] > 0)


def test_caption_matches_objects_and_parses_back(clips):
    for clip in clips:
        assert ss.parse_caption(clip['caption']) == _objects(clip)
        for color, shape, motion in _objects(clip):
            article = 'an' if color[0] in 'aeiou' else 'a'
            assert f'{article} {color} {shape} {ss.MOTION_PHRASES[motion]}' in clip['caption']
    assert ss.parse_caption('a red circle moves to the left') == [('red', 'circle', 'left')]
    assert ss.parse_caption('an orange square moves up and a red circle moves down and to the left') == [
        ('orange', 'square', 'up'), ('red', 'circle', 'down-left')]
    assert ss.parse_caption('a blue square bounces between the walls and a green triangle moves '
                            'up and to the left') == [('blue', 'square', 'bounce'),
                                                       ('green', 'triangle', 'up-left')]
    for bad in ('a red hexagon moves to the left', 'red circle moves up', 'a red circle flies'):
        with pytest.raises(ValueError, match='caption'):
            ss.parse_caption(bad)


def test_motion_annotations_follow_the_trajectory(clips):
    seen = set()
    for clip in clips:
        for k, motion in enumerate(clip['motions']):
            seen.add(motion)
            track = clip['centroids'][k]
            move = track[-1] - track[0]
            if motion == 'still':
                assert np.all(track == track[0])
            elif motion == 'bounce':
                assert clip['bounce_times'][k], 'a bouncing object never hit a wall'
                turn = min(clip['bounce_times'][k]) * CONFIG.fps
                margin = ss.BOUNCE_MARGIN_FRAMES
                assert margin - 1e-6 <= turn <= CONFIG.num_frames - 1 - margin + 1e-6
                # The object touches the frame edge near the contact frame.
                frame = clip['bounce_frames'][k][0]
                box = clip['boxes'][k, frame]
                assert min(box[0], box[1], CONFIG.height - box[2], CONFIG.width - box[3]) <= 2
            else:
                dy, dx = ss.DIRECTIONS[motion]
                assert not clip['bounce_times'][k]
                assert np.dot(move, [dy, dx]) > 0.9 * np.linalg.norm(move) > 0
                assert np.linalg.norm(move) >= min(CONFIG.speeds) * CONFIG.frame_size * (
                    (CONFIG.num_frames - 1) / CONFIG.fps) - 1.5
    assert len(seen) >= 6


def test_pitch_follows_shape_and_height(clips):
    for clip in clips:
        for k, shape in enumerate(clip['shapes']):
            box = clip['boxes'][k]
            center_y = (box[:, 0] + box[:, 2]) / 2
            expected = ss.shape_pitch_hz(CONFIG, shape, center_y)
            # The mask's box centre is within ~1 px of the true centre (a triangle's apex may miss
            # its pixel row): 1 px of height is 2 * glide * 100 / H = 7.8 cents.
            cents = 1200 * np.log2(clip['pitch_hz'][k] / expected)
            assert np.abs(cents).max() < 10
            up = clip['centroids'][k, -1, 0] < clip['centroids'][k, 0, 0] - 2
            if up and clip['motions'][k] != 'bounce':
                assert clip['pitch_hz'][k, -1] > clip['pitch_hz'][k, 0]


def test_audio_spectrum_holds_the_annotated_tones():
    """Direct check of the synthesis: a still object's tone is the strongest spectral peak."""
    config = dataclasses.replace(CONFIG, motions=('still',), max_objects=1)
    for index in range(4):
        clip = ss.generate_clip(config, 'train', index)
        spectrum = np.abs(np.fft.rfft(clip['audio'] * np.hanning(len(clip['audio'])), 1 << 18))
        freqs = np.fft.rfftfreq(1 << 18, 1 / config.sample_rate)
        peak = freqs[spectrum.argmax()]
        assert abs(1200 * np.log2(peak / clip['pitch_hz'][0, 0])) < 5
        assert not any(clip['bounce_times'][0])


def test_clicks_sound_at_wall_contacts():
    config = dataclasses.replace(CONFIG, motions=('bounce',), max_objects=1)
    clip = ss.generate_clip(config, 'train', 0)
    (contact,) = clip['bounce_times'][0]
    high = np.diff(clip['audio'])  # clicks are 3 kHz bursts, tones stay below 1.1 kHz
    energy = np.convolve(high ** 2, np.ones(80), mode='same')
    loudest = np.argmax(energy) / config.sample_rate
    assert abs(loudest - contact) < 0.01
    # Two bouncing objects never click at (nearly) the same time: each click stays audible.
    both = dataclasses.replace(config, min_objects=2, max_objects=2)
    for index in range(12):
        times = sorted(t for ts in ss.generate_clip(both, 'train', index)['bounce_times'] for t in ts)
        assert len(times) >= 2 and np.min(np.diff(times)) >= 0.15


def test_compositional_split_holds_unseen_combinations():
    train = set(ss.split_combinations(CONFIG, 'train'))
    held_out = set(ss.split_combinations(CONFIG, 'compositional'))
    assert train and held_out and not train & held_out
    for position in range(3):  # every colour, shape and motion alone appears in training
        assert {c[position] for c in held_out} <= {c[position] for c in train}
    for index in range(20):
        assert set(_objects(ss.generate_clip(CONFIG, 'compositional', index))) <= held_out
        for split in ('train', 'validation', 'test'):
            assert not set(_objects(ss.generate_clip(CONFIG, split, index))) & held_out


def test_backgrounds_and_larger_frames():
    config = ss.WorldConfig(height=128, width=96, num_frames=9, fps=4.0, sample_rate=24000)
    kinds = set()
    for index in range(8):
        clip = ss.generate_clip(config, 'validation', index)
        kinds.add(clip['background'])
        assert clip['video'].shape == (9, 128, 96, 3)
        assert clip['audio'].shape == (config.num_samples,) == (54000,)
    assert kinds == {'plain', 'textured'}
