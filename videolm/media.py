"""Reading and writing media: mp4 (H.264 + AAC audio), gif, png, wav, and the small conversions
needed to condition a model on one's own images, clips and sounds.

Arrays: video uint8 [T, H, W, 3]; image uint8 [H, W, 3]; audio float32 [S] (mono) in [-1, 1].
Writes are atomic (a temporary file in the same folder, renamed into place). A missing, empty or
undecodable file raises ``MediaError`` naming the file and what was expected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
import tempfile

import av
import numpy as np
import soundfile
from PIL import Image, ImageSequence
from scipy import signal

VIDEO_EXTENSIONS = ('.mp4', '.mov', '.mkv', '.webm', '.avi')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class MediaError(ValueError):
    """A media file is missing, empty or cannot be decoded as what was expected."""


@dataclasses.dataclass
class Video:
    video: np.ndarray                 # uint8 [T, H, W, 3]
    fps: float | None                 # None for a still image
    audio: np.ndarray | None = None   # float32 [S] mono, or [S, C] when read with mono=False
    sample_rate: int | None = None


# ----------------------------------------------------------------------------- helpers


def _check_video(video, name='video') -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f'{name} must be uint8 [T, H, W, 3] with T >= 1, got shape {video.shape}')
    if video.dtype != np.uint8:
        raise ValueError(f'{name} must be uint8, got {video.dtype}; see media.to_uint8')
    return video


def _check_audio(audio, sample_rate) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[0] == 0:
        raise ValueError(f'audio must be float [S] or [S, C] with S >= 1, got shape {audio.shape}')
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f'audio must be float in [-1, 1], got {audio.dtype}')
    if sample_rate is None or int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f'sample_rate must be a positive integer, got {sample_rate!r}')
    return np.clip(audio.astype(np.float32), -1.0, 1.0)


def _check_fps(fps) -> fractions.Fraction:
    if fps is None or not fps > 0:
        raise ValueError(f'fps must be positive, got {fps!r}')
    return fractions.Fraction(fps).limit_denominator(1001)


@contextlib.contextmanager
def _atomic(path):
    """Yields a temporary path next to ``path`` (same extension); renames it into place on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=ext, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_readable(path, expected: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f'{path}: no such file (expected {expected})')
    if os.path.getsize(path) == 0:
        raise MediaError(f'{path}: file is empty (expected {expected})')
    return path


# ----------------------------------------------------------------------------- writing


def write_mp4(path, video, fps: float, audio=None, sample_rate: int | None = None, crf: int = 18,
              audio_bitrate: int = 96000) -> None:
    """H.264 (yuv420p) mp4, with ``audio`` muxed in as AAC when given. Odd frame sizes are padded
    to even ones by repeating the last row/column (yuv420p needs even sizes)."""
    video = _check_video(video)
    rate = _check_fps(fps)
    if audio is not None:
        audio = _check_audio(audio, sample_rate)
        if audio.ndim == 2 and audio.shape[1] not in (1, 2):
            raise ValueError(f'write_mp4: audio must be mono [S] or [S, 1|2], got {audio.shape}')
    if video.shape[1] % 2 or video.shape[2] % 2:
        video = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)),
                       mode='edge')
    with _atomic(path) as tmp, av.open(tmp, 'w', format='mp4') as container:
        stream = container.add_stream('libx264', rate=rate)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = 'yuv420p'
        stream.options = {'crf': str(int(crf))}
        if audio is not None:
            sound = container.add_stream('aac', rate=int(sample_rate))
            sound.layout = 'stereo' if audio.ndim == 2 and audio.shape[1] == 2 else 'mono'
            sound.bit_rate = int(audio_bitrate)
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
                container.mux(packet)
        container.mux(stream.encode())
        if audio is not None:
            planar = audio[None] if audio.ndim == 1 else np.ascontiguousarray(audio.T)
            frame = av.AudioFrame.from_ndarray(planar, format='fltp', layout=sound.layout)
            frame.sample_rate = int(sample_rate)
            frame.pts = 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode(None))


def write_gif(path, video, fps: float) -> None:
    """Looping gif (each frame quantised to its own 256-colour palette)."""
    video = _check_video(video)
    _check_fps(fps)
    frames = [Image.fromarray(frame) for frame in video]
    with _atomic(path) as tmp:
        frames[0].save(tmp, format='GIF', save_all=True, append_images=frames[1:],
                       duration=int(round(1000 / fps)), loop=0, optimize=False)  # 10 ms steps


def write_wav(path, audio, sample_rate: int, subtype: str = 'PCM_16') -> None:
    """wav of float audio [S] or [S, C] in [-1, 1] (clipped)."""
    audio = _check_audio(audio, sample_rate)
    with _atomic(path) as tmp:
        soundfile.write(tmp, audio, int(sample_rate), subtype=subtype, format='WAV')


def write_png(path, image) -> None:
    """png of a uint8 [H, W, 3] (or [H, W]) image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and
                                                               image.shape[-1] != 3):
        raise ValueError(f'image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}')
    with _atomic(path) as tmp:
        Image.fromarray(image).save(tmp, format='PNG')


def tile_frames(video, columns: int | None = None, border: int = 1, fill: int = 255) -> np.ndarray:
    """Frames of a [T, H, W, 3] video tiled into one [rows*(H+b)-b, cols*(W+b)-b, 3] image, row by
    row (columns defaults to T: one row)."""
    video = _check_video(video)
    count, height, width, _ = video.shape
    columns = count if columns is None else max(1, min(int(columns), count))
    rows = -(-count // columns)
    grid = np.full((rows * (height + border) - border, columns * (width + border) - border, 3),
                   fill, np.uint8)
    for k, frame in enumerate(video):
        r, c = divmod(k, columns)
        grid[r * (height + border):r * (height + border) + height,
             c * (width + border):c * (width + border) + width] = frame
    return grid


def tile_clips(videos, columns: int | None = None, border: int = 1, fill: int = 255) -> np.ndarray:
    """Several clips side by side (in a grid of ``columns``) as one video [T, H', W', 3]; shorter
    clips hold their last frame. All clips need the same frame size."""
    videos = [_check_video(v, f'videos[{i}]') for i, v in enumerate(videos)]
    if not videos:
        raise ValueError('tile_clips needs at least one clip')
    if len({v.shape[1:] for v in videos}) != 1:
        raise ValueError(f'tile_clips: clips have different frame sizes '
                         f'{sorted({v.shape[1:3] for v in videos})}; resize them first')
    length = max(len(v) for v in videos)
    frames = []
    for t in range(length):
        frames.append(tile_frames(np.stack([v[min(t, len(v) - 1)] for v in videos]),
                                  columns, border, fill))
    return np.stack(frames)


def write_png_grid(path, video, columns: int | None = None, border: int = 1) -> None:
    """png of the frames of ``video`` tiled in a grid (see tile_frames)."""
    write_png(path, tile_frames(video, columns, border))


# ----------------------------------------------------------------------------- reading


def read_video(path, mono: bool = True) -> Video:
    """Frames (and audio, when present) of an mp4/mov/mkv/webm/avi, a gif, or a still image
    (a 1-frame video with fps None)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == '.gif':
        return _read_gif(path)
    if ext in IMAGE_EXTENSIONS:
        return Video(read_image(path)[None], None)
    if ext not in VIDEO_EXTENSIONS:
        raise MediaError(f'{os.fspath(path)}: unsupported extension {ext!r} (expected one of '
                         f'{VIDEO_EXTENSIONS + (".gif",) + IMAGE_EXTENSIONS})')
    path = _check_readable(path, 'a video file')
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f'{path}: has no video stream (expected a video file)')
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [f.to_ndarray(format='rgb24') for f in container.decode(stream)]
        audio, sample_rate = _decode_audio(path, mono) if _has_audio(path) else (None, None)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f'{path}: cannot decode as a video ({error})') from error
    if not frames:
        raise MediaError(f'{path}: no video frames decoded (expected a video file)')
    return Video(np.stack(frames), float(rate) if rate else None, audio, sample_rate)


def _has_audio(path) -> bool:
    with av.open(path) as container:
        return bool(container.streams.audio)


def _decode_audio(path, mono: bool):
    with av.open(path) as container:
        stream = container.streams.audio[0]
        sample_rate = stream.codec_context.sample_rate
        chunks = [_frame_samples(frame) for frame in container.decode(stream)]
        expected = None
        if stream.duration is not None and stream.time_base is not None:
            expected = int(round(float(stream.duration * stream.time_base) * sample_rate))
    if not chunks:
        raise MediaError(f'{path}: audio stream holds no samples')
    audio = np.concatenate(chunks, axis=0)                                 # [S, C]
    if expected is not None and 0 < expected <= len(audio):
        audio = audio[:expected]   # the encoder pads the last frame
    return (audio.mean(axis=1) if mono else audio), int(sample_rate)


def _frame_samples(frame) -> np.ndarray:
    """float32 [n, C] in [-1, 1] from a decoded audio frame (planar or packed, float or int)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    data = data.reshape(channels, -1).T if frame.format.is_planar else data.reshape(-1, channels)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32)


def _read_gif(path) -> Video:
    path = _check_readable(path, 'a gif')
    try:
        with Image.open(path) as image:
            durations, frames = [], []
            for frame in ImageSequence.Iterator(image):
                durations.append(frame.info.get('duration', 0))
                frames.append(np.asarray(frame.convert('RGB')))
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f'{path}: cannot decode as a gif ({error})') from error
    mean_ms = float(np.mean(durations)) if durations else 0.0
    return Video(np.stack(frames), 1000.0 / mean_ms if mean_ms > 0 else None)


def read_image(path) -> np.ndarray:
    """uint8 [H, W, 3] of a png/jpg/bmp/webp (first frame of a gif)."""
    path = _check_readable(path, 'an image')
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert('RGB'))
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f'{path}: cannot decode as an image ({error})') from error


def read_audio(path, mono: bool = True) -> tuple[np.ndarray, int]:
    """(float32 audio [S] (or [S, C] with mono=False), sample_rate) of a wav/flac/ogg file, or the
    audio track of a video file."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in VIDEO_EXTENSIONS:
        path = _check_readable(path, 'a video file with an audio track')
        try:
            if not _has_audio(path):
                raise MediaError(f'{path}: has no audio stream (expected a video with sound)')
            return _decode_audio(path, mono)
        except (av.error.FFmpegError, OSError) as error:
            raise MediaError(f'{path}: cannot decode its audio ({error})') from error
    path = _check_readable(path, 'an audio file')
    try:
        audio, sample_rate = soundfile.read(path, dtype='float32', always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise MediaError(f'{path}: cannot decode as audio ({error})') from error
    if len(audio) == 0:
        raise MediaError(f'{path}: audio file holds no samples')
    return (audio.mean(axis=1) if mono else audio), int(sample_rate)


read_wav = read_audio


# ----------------------------------------------------------------------------- conversions


def to_uint8(video, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float media in ``value_range`` to uint8 [0, 255] (clipped, rounded)."""
    low, high = value_range
    scaled = (np.asarray(video, np.float32) - low) / (high - low) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def resize_video(video, height: int, width: int) -> np.ndarray:
    """Resizes every frame of a uint8 [T, H, W, 3] video (bicubic; antialiased when shrinking)."""
    video = _check_video(video)
    if height <= 0 or width <= 0:
        raise ValueError(f'resize_video: target size must be positive, got {height}x{width}')
    if video.shape[1:3] == (height, width):
        return video
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                     for f in video])


def center_crop_resize(video, height: int, width: int) -> np.ndarray:
    """Crops the centre of each frame to the target aspect ratio, then resizes to height x width."""
    video = _check_video(video)
    _, h, w, _ = video.shape
    if h * width > w * height:                     # too tall
        crop = max(1, round(w * height / width))
        top = (h - crop) // 2
        video = video[:, top:top + crop]
    else:
        crop = max(1, round(h * width / height))
        left = (w - crop) // 2
        video = video[:, :, left:left + crop]
    return resize_video(video, height, width)


def resample_frames(video, fps: float, target_fps: float, num_frames: int | None = None) -> np.ndarray:
    """Picks the frames nearest to a ``target_fps`` clock; optionally exactly ``num_frames`` of
    them (the last frame repeats if the clip is too short)."""
    video = _check_video(video)
    if not fps > 0 or not target_fps > 0:
        raise ValueError(f'resample_frames: fps must be positive, got {fps}, {target_fps}')
    count = num_frames if num_frames is not None else max(1, int(len(video) / fps * target_fps))
    index = np.floor(np.arange(count) * fps / target_fps + 1e-6).astype(int)
    return video[np.minimum(index, len(video) - 1)]


def resample_audio(audio, sample_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling of float audio [S] (or [S, C]) to ``target_rate``."""
    audio = _check_audio(audio, sample_rate)
    if int(target_rate) != target_rate or target_rate <= 0:
        raise ValueError(f'target_rate must be a positive integer, got {target_rate!r}')
    if target_rate == sample_rate:
        return audio
    ratio = fractions.Fraction(int(target_rate), int(sample_rate))
    out = signal.resample_poly(audio, ratio.numerator, ratio.denominator, axis=0)
    return out.astype(np.float32)


def fit_length(audio, num_samples: int) -> np.ndarray:
    """Crops or zero-pads audio [S] (or [S, C]) to exactly ``num_samples``."""
    audio = np.asarray(audio, np.float32)
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.pad(audio, [(0, num_samples - len(audio))] + [(0, 0)] * (audio.ndim - 1))
