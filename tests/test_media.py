"""Media I/O: round trips (mp4 with audio, gif, wav, png), errors naming the file, conversions."""
import os

import av
import numpy as np
import pytest

from videolm import media
from videolm.data import soundshapes as ss

CONFIG = ss.WorldConfig()


@pytest.fixture(scope='module')
def bounce_clip():
    """A plain-background clip with a wall bounce (so its audio has a click to align on)."""
    for index in range(200):
        clip = ss.generate_clip(CONFIG, 'test', index)
        if clip['background'] == 'plain' and any(clip['bounce_times']):
            return clip
    raise AssertionError('no plain clip with a bounce in the first 200')


def _lag(reference, decoded, max_lag=2000):
    """Offset (samples) maximising the cross-correlation of decoded against reference."""
    n = len(reference)
    corr = np.correlate(decoded[max_lag:n - max_lag], reference, mode='valid')
    return int(np.argmax(corr)) - max_lag


def test_mp4_round_trip_with_audio(tmp_path, bounce_clip):
    path = tmp_path / 'clip.mp4'
    media.write_mp4(path, bounce_clip['video'], CONFIG.fps, audio=bounce_clip['audio'],
                    sample_rate=CONFIG.sample_rate)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == 'h264'
        assert container.streams.video[0].codec_context.pix_fmt == 'yuv420p'
        assert container.streams.audio[0].codec_context.name == 'aac'
    back = media.read_video(path)
    assert back.video.shape == bounce_clip['video'].shape and back.video.dtype == np.uint8
    assert back.fps == pytest.approx(CONFIG.fps)
    assert np.abs(back.video.astype(int) - bounce_clip['video']).mean() < 4
    assert back.sample_rate == CONFIG.sample_rate
    assert back.audio.shape == bounce_clip['audio'].shape and back.audio.dtype == np.float32
    # Aligned to the sample (the encoder's priming delay is removed) and faithful.
    assert _lag(bounce_clip['audio'], back.audio) == 0
    corr = np.corrcoef(back.audio, bounce_clip['audio'])[0, 1]
    assert corr > 0.98
    audio, rate = media.read_audio(path)
    np.testing.assert_array_equal(audio, back.audio)
    assert rate == CONFIG.sample_rate


def test_mp4_without_audio_and_odd_size(tmp_path, bounce_clip):
    path = tmp_path / 'odd.mp4'
    media.write_mp4(path, bounce_clip['video'][:, :63, :61], 12.5)
    back = media.read_video(path)
    assert back.audio is None and back.sample_rate is None
    assert back.video.shape == (CONFIG.num_frames, 64, 62, 3)  # padded to even sizes
    assert back.fps == pytest.approx(12.5)
    with pytest.raises(media.MediaError, match='odd.mp4.*no audio'):
        media.read_audio(path)


def test_stereo_and_packed_integer_audio_tracks(tmp_path):
    rate = 16000
    times = np.arange(rate) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * times),
                       0.25 * np.sin(2 * np.pi * 660 * times)], axis=1).astype(np.float32)
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    media.write_mp4(tmp_path / 'stereo.mp4', frames, 8, audio=stereo, sample_rate=rate)
    both, _ = media.read_audio(tmp_path / 'stereo.mp4', mono=False)
    assert both.shape == stereo.shape
    assert np.corrcoef(both[:, 0], stereo[:, 0])[0, 1] > 0.98
    assert np.corrcoef(both[:, 1], stereo[:, 1])[0, 1] > 0.98
    # A .mov with interleaved 16-bit PCM (another encoder's layout) reads back per channel.
    with av.open(str(tmp_path / 'pcm.mov'), 'w') as container:
        video = container.add_stream('libx264', rate=8)
        video.width, video.height, video.pix_fmt = 16, 16, 'yuv420p'
        sound = container.add_stream('pcm_s16le', rate=rate)
        sound.layout = 'stereo'
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        container.mux(video.encode())
        packed = np.round(stereo * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(packed, format='s16', layout='stereo')
        frame.sample_rate, frame.pts = rate, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    pcm, got_rate = media.read_audio(tmp_path / 'pcm.mov', mono=False)
    assert got_rate == rate
    np.testing.assert_allclose(pcm, stereo, atol=1e-4)
    with pytest.raises(ValueError, match='mono'):
        media.write_mp4(tmp_path / 'x.mp4', frames, 8, np.zeros((100, 3), np.float32), rate)


def test_gif_round_trip(tmp_path, bounce_clip):
    path = tmp_path / 'clip.gif'
    media.write_gif(path, bounce_clip['video'], 10.0)
    back = media.read_video(path)
    # A plain-background clip has few colours: the gif palette holds them exactly.
    np.testing.assert_array_equal(back.video, bounce_clip['video'])
    assert back.fps == pytest.approx(10.0)


def test_wav_round_trip_mono_and_stereo(tmp_path, bounce_clip):
    path = tmp_path / 'sound.wav'
    media.write_wav(path, bounce_clip['audio'], CONFIG.sample_rate)
    audio, rate = media.read_audio(path)
    assert rate == CONFIG.sample_rate and audio.dtype == np.float32
    np.testing.assert_allclose(audio, bounce_clip['audio'], atol=1 / 32767)
    stereo = np.stack([bounce_clip['audio'], -bounce_clip['audio']], axis=1)
    media.write_wav(path, stereo, 22050, subtype='FLOAT')
    both, rate = media.read_audio(path, mono=False)
    assert rate == 22050 and both.shape == stereo.shape
    np.testing.assert_array_equal(both, stereo)
    np.testing.assert_allclose(media.read_audio(path)[0], 0.0, atol=1e-7)  # mono = channel mean


def test_png_grids_and_images(tmp_path):
    video = np.arange(5 * 4 * 3 * 3, dtype=np.uint8).reshape(5, 4, 3, 3)
    grid = media.tile_frames(video, columns=2, border=1, fill=7)
    assert grid.shape == (3 * 5 - 1, 2 * 4 - 1, 3)
    np.testing.assert_array_equal(grid[5:9, 4:7], video[3])   # row 1, column 1
    np.testing.assert_array_equal(grid[10:14, 0:3], video[4])  # row 2, column 0
    assert np.all(grid[4, :] == 7) and np.all(grid[10:14, 3:] == 7)
    media.write_png_grid(tmp_path / 'grid.png', video, columns=2)
    np.testing.assert_array_equal(media.read_image(tmp_path / 'grid.png'),
                                  media.tile_frames(video, columns=2))
    still = media.read_video(tmp_path / 'grid.png')
    assert still.video.shape == (1,) + grid.shape and still.fps is None

    short = video[:2] + 100
    side = media.tile_clips([video, short], border=0)
    assert side.shape == (5, 4, 6, 3)
    np.testing.assert_array_equal(side[:, :, :3], video)
    np.testing.assert_array_equal(side[4, :, 3:], short[1])  # the short clip holds its last frame
    with pytest.raises(ValueError, match='frame sizes'):
        media.tile_clips([video, video[:, :2]])


def test_missing_empty_and_corrupt_files_raise_media_error(tmp_path, bounce_clip):
    good = tmp_path / 'good.mp4'
    media.write_mp4(good, bounce_clip['video'], CONFIG.fps, bounce_clip['audio'], CONFIG.sample_rate)
    data = good.read_bytes()
    (tmp_path / 'truncated.mp4').write_bytes(data[:len(data) // 3])
    (tmp_path / 'garbage.mp4').write_bytes(b'\x00not a video' * 64)
    (tmp_path / 'empty.mp4').write_bytes(b'')
    (tmp_path / 'garbage.wav').write_bytes(b'RIFF' + b'\x01' * 64)
    (tmp_path / 'garbage.png').write_bytes(b'\x89PNG' + b'\x02' * 64)
    (tmp_path / 'garbage.gif').write_bytes(b'GIF89a' + b'\x03' * 64)
    cases = [
        (media.read_video, 'missing.mp4', 'no such file'),
        (media.read_video, 'empty.mp4', 'empty'),
        (media.read_video, 'truncated.mp4', 'cannot decode'),
        (media.read_video, 'garbage.mp4', 'cannot decode'),
        (media.read_audio, 'garbage.wav', 'cannot decode'),
        (media.read_audio, 'missing.wav', 'no such file'),
        (media.read_image, 'garbage.png', 'cannot decode'),
        (media.read_video, 'garbage.gif', 'cannot decode'),
        (media.read_video, 'notes.txt', 'unsupported extension'),
    ]
    for reader, name, words in cases:
        with pytest.raises(media.MediaError, match=words) as info:
            reader(tmp_path / name)
        assert name in str(info.value)
    assert issubclass(media.MediaError, ValueError)


def test_failed_write_leaves_existing_file_and_no_temporaries(tmp_path, bounce_clip, monkeypatch):
    path = tmp_path / 'out.mp4'
    media.write_mp4(path, bounce_clip['video'], CONFIG.fps)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError('encoder failed')

    monkeypatch.setattr(av.VideoFrame, 'from_ndarray', broken)
    with pytest.raises(RuntimeError, match='encoder failed'):
        media.write_mp4(path, bounce_clip['video'], CONFIG.fps)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['out.mp4']


def test_bad_arrays_raise():
    video = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='uint8'):
        media.write_gif('/tmp/never.gif', video.astype(np.float32), 8)
    with pytest.raises(ValueError, match='fps'):
        media.write_mp4('/tmp/never.mp4', video, 0)
    with pytest.raises(ValueError, match='sample_rate'):
        media.write_wav('/tmp/never.wav', np.zeros(10, np.float32), None)
    assert not os.path.exists('/tmp/never.gif')


def test_conversions():
    rate = 16000
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    down = media.resample_audio(tone, rate, 11025)
    assert down.shape == (11025,)
    spectrum = np.abs(np.fft.rfft(down))
    assert np.fft.rfftfreq(len(down), 1 / 11025)[spectrum.argmax()] == pytest.approx(440, abs=1)
    assert media.fit_length(tone, 100).shape == (100,)
    padded = media.fit_length(tone[:10], 20)
    assert padded.shape == (20,) and np.all(padded[10:] == 0)

    video = np.random.default_rng(0).integers(0, 256, (6, 40, 60, 3), dtype=np.uint8)
    assert media.resize_video(video, 20, 30).shape == (6, 20, 30, 3)
    flat = np.full((2, 40, 60, 3), 77, np.uint8)
    assert np.all(media.resize_video(flat, 17, 23) == 77)
    cropped = media.center_crop_resize(video, 32, 32)
    assert cropped.shape == (6, 32, 32, 3)
    same = media.center_crop_resize(video, 40, 40)  # a pure centre crop: columns 10..49
    np.testing.assert_array_equal(same, video[:, :, 10:50])
    np.testing.assert_array_equal(media.resample_frames(video, 24, 12), video[[0, 2, 4]])
    assert media.resample_frames(video, 8, 8, num_frames=9).shape[0] == 9
    np.testing.assert_array_equal(media.to_uint8(np.array([-1.0, 0.0, 1.0]), (-1, 1)), [0, 128, 255])
