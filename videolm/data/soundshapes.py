"""SoundShapes: a generated audio-visual world in which every answer can be checked.

Coloured shapes move over a plain or textured grey background. Each object sounds a pure tone
whose pitch is set by its shape and glides with its height (higher on screen = higher pitch), and
a short click sounds whenever an object touches a wall. A caption from a small grammar describes
the clip ("a red circle moves to the left and a blue square bounces between the walls").

Everything is a deterministic function of (config, split, index). Object positions are analytic
functions of continuous time, so the video frames and the audio samples are drawn from the same
motion: frame ``t`` is a snapshot at time ``t / fps``; audio sample ``n`` is at time ``n / sample_rate``.

Coordinates: a pixel (i, j) covers [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5). An object
of size ``s`` centred at (cy, cx) fits in the square [cy - s/2, cy + s/2] x [cx - s/2, cx + s/2].
Annotated centroids are the mean (row, column) index of the object's mask pixels.

Splits draw from disjoint random streams. A fixed rule holds out some colour x shape x motion
combinations: ``train``, ``validation`` and ``test`` never contain them and every object of the
``compositional`` split is one of them (each colour, shape and motion alone is seen in training).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'diamond')

# Saturated colours (chroma >= 140) far from each other and from the grey backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    'red': (220, 40, 40),
    'orange': (245, 130, 20),
    'yellow': (240, 225, 30),
    'green': (40, 180, 60),
    'cyan': (30, 200, 220),
    'blue': (40, 70, 230),
    'purple': (150, 60, 210),
    'pink': (245, 100, 190),
}

MOTIONS: tuple[str, ...] = ('left', 'right', 'up', 'down', 'up-left', 'up-right', 'down-left',
                            'down-right', 'bounce', 'still')

BACKGROUNDS: tuple[str, ...] = ('plain', 'textured')

SPLITS: tuple[str, ...] = ('train', 'validation', 'test', 'compositional')

MOTION_PHRASES: dict[str, str] = {
    'left': 'moves to the left',
    'right': 'moves to the right',
    'up': 'moves up',
    'down': 'moves down',
    'up-left': 'moves up and to the left',
    'up-right': 'moves up and to the right',
    'down-left': 'moves down and to the left',
    'down-right': 'moves down and to the right',
    'bounce': 'bounces between the walls',
    'still': 'stays still',
}

_DIAG = 1.0 / math.sqrt(2.0)
# Unit direction (dy, dx) of each straight motion; y grows downwards.
DIRECTIONS: dict[str, tuple[float, float]] = {
    'left': (0.0, -1.0), 'right': (0.0, 1.0), 'up': (-1.0, 0.0), 'down': (1.0, 0.0),
    'up-left': (-_DIAG, -_DIAG), 'up-right': (-_DIAG, _DIAG),
    'down-left': (_DIAG, -_DIAG), 'down-right': (_DIAG, _DIAG),
    'still': (0.0, 0.0),
}

# A bouncing object's first wall contact lies this many frames away from either end of the clip,
# so both legs of the bounce are visible.
BOUNCE_MARGIN_FRAMES = 4
CLICK_SECONDS = 0.02
_CLICK_DECAY_SECONDS = 0.003
_FADE_SECONDS = 0.005
_PHASE_HOP = 16  # samples
_MIN_OBJECT_PIXELS = 4.0
_GAP_PIXELS = 2.0
_MIN_CLICK_GAP_SECONDS = 0.15
_PLACEMENT_TRIES = 32
_REDRAWS = 8


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a SoundShapes world. Defaults give VideoPoet's 17 frames at 8 fps."""
    height: int = 64
    width: int = 64
    num_frames: int = 17
    fps: float = 8.0
    sample_rate: int = 16000
    min_objects: int = 1
    max_objects: int = 2
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    motions: tuple[str, ...] = MOTIONS
    # Speeds in frame sizes (min(height, width)) per second; each object draws one.
    speeds: tuple[float, ...] = (0.15, 0.3)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    # Object size (side of its bounding square) as a fraction of min(height, width): (low, high).
    object_size: tuple[float, float] = (0.18, 0.3)
    # Tone of shape k: pitch_base_hz * 2 ** (k * pitch_step_semitones / 12), gliding by
    # +-pitch_glide_semitones from the bottom of the frame to the top.
    pitch_base_hz: float = 220.0
    pitch_step_semitones: float = 8.0
    pitch_glide_semitones: float = 2.5
    tone_amplitude: float = 0.25
    click_amplitude: float = 0.45
    click_hz: float = 3000.0
    # A colour x shape x motion combination (indices into COLORS, SHAPES, MOTIONS) is held out of
    # train/validation/test, and used by the compositional split, when (c + s + m) % this == 0.
    holdout_modulus: int = 7
    seed: int = 0

    def __post_init__(self):
        # Configs and command lines may hand over lists; keep the config hashable.
        for name in ('shapes', 'colors', 'motions', 'speeds', 'backgrounds', 'object_size'):
            value = getattr(self, name)
            if isinstance(value, (list, np.ndarray)):
                object.__setattr__(self, name, tuple(value.tolist() if isinstance(
                    value, np.ndarray) else value))

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field."""
        for name in ('height', 'width', 'num_frames', 'sample_rate'):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f'WorldConfig.{name} must be a positive integer, got {value!r}')
        if not self.fps > 0 or not math.isfinite(self.fps):
            raise ValueError(f'WorldConfig.fps must be a positive number, got {self.fps!r}')
        _check_names('shapes', self.shapes, SHAPES)
        _check_names('colors', self.colors, tuple(COLORS))
        _check_names('motions', self.motions, MOTIONS)
        _check_names('backgrounds', self.backgrounds, BACKGROUNDS)
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f'WorldConfig.min_objects/max_objects must satisfy 1 <= min <= max, '
                             f'got {self.min_objects}, {self.max_objects}')
        if self.max_objects > min(len(self.shapes), len(self.colors)):
            raise ValueError(f'WorldConfig.max_objects={self.max_objects} exceeds the number of '
                             f'distinct shapes/colours available to one clip '
                             f'({len(self.shapes)} shapes, {len(self.colors)} colours)')
        if len(self.object_size) != 2:
            raise ValueError(f'WorldConfig.object_size must be (low, high), got {self.object_size}')
        low, high = self.object_size
        if not 0 < low <= high:
            raise ValueError(f'WorldConfig.object_size must be (low, high) with 0 < low <= high, '
                             f'got {self.object_size}')
        if high > 1.0:
            raise ValueError(f'WorldConfig.object_size high={high} makes an object larger than the '
                             f'frame (at most 1.0 of min(height, width))')
        if low * self.frame_size < _MIN_OBJECT_PIXELS:
            raise ValueError(f'WorldConfig.object_size low={low} gives objects under '
                             f'{_MIN_OBJECT_PIXELS:g} pixels at {self.height}x{self.width}')
        if not self.speeds or any(not s > 0 for s in self.speeds):
            raise ValueError(f'WorldConfig.speeds must be positive numbers, got {self.speeds}')
        straight = [m for m in self.motions if m not in ('bounce', 'still')]
        travel = max(self.speeds) * self.duration
        if straight and travel + high > 1.0:
            raise ValueError(
                f'WorldConfig.speeds: an object at speed {max(self.speeds)} travels {travel:.2f} '
                f'frame sizes in {self.duration:.3f} s and would leave the frame (travel + '
                f'object_size high must be <= 1); lower the speeds or num_frames')
        if 'bounce' in self.motions and self.num_frames < 2 * BOUNCE_MARGIN_FRAMES + 1:
            raise ValueError(f'WorldConfig.num_frames={self.num_frames}: bounce needs at least '
                             f'{2 * BOUNCE_MARGIN_FRAMES + 1} frames')
        nyquist = self.sample_rate / 2
        if self.max_pitch_hz >= 0.45 * self.sample_rate or self.click_hz >= nyquist:
            raise ValueError(f'WorldConfig.sample_rate={self.sample_rate} is too low for tones up to '
                             f'{self.max_pitch_hz:.0f} Hz and clicks at {self.click_hz:.0f} Hz')
        if self.pitch_step_semitones <= 2 * self.pitch_glide_semitones:
            raise ValueError('WorldConfig.pitch_step_semitones must exceed 2 * pitch_glide_semitones '
                             'so the pitch ranges of different shapes do not overlap')
        if self.max_objects * self.tone_amplitude + self.click_amplitude > 1.0:
            raise ValueError('WorldConfig.tone_amplitude/click_amplitude: max_objects tones plus a '
                             'click must stay within [-1, 1]')
        if self.holdout_modulus < 2:
            raise ValueError(f'WorldConfig.holdout_modulus must be >= 2, got {self.holdout_modulus}')

    @property
    def num_samples(self) -> int:
        return int(round(self.num_frames / self.fps * self.sample_rate))

    @property
    def duration(self) -> float:
        """Clip length in seconds (num_frames / fps), shared by video and audio."""
        return self.num_frames / self.fps

    @property
    def frame_size(self) -> int:
        return min(self.height, self.width)

    @property
    def max_pitch_hz(self) -> float:
        top = max(SHAPES.index(s) for s in self.shapes)
        return shape_pitch_hz(self, SHAPES[top], 0.0)

    def palette(self) -> np.ndarray:
        """[C, 3] float32 RGB of ``self.colors`` (in that order)."""
        return np.array([COLORS[c] for c in self.colors], np.float32)


def _check_names(field: str, names, known: tuple[str, ...]) -> None:
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f'WorldConfig.{field} must be a non-empty tuple of names from {known}, '
                         f'got {names!r}')
    for name in names:
        if name not in known:
            raise ValueError(f'WorldConfig.{field}: unknown name {name!r}; expected one of {known}')
    if len(set(names)) != len(names):
        raise ValueError(f'WorldConfig.{field} has duplicates: {names!r}')


def shape_pitch_hz(config: WorldConfig, shape: str, center_y):
    """Pitch (Hz) of ``shape`` whose centre is at continuous height ``center_y`` (0 = top edge)."""
    semitones = SHAPES.index(shape) * config.pitch_step_semitones
    rel_height = 1.0 - 2.0 * np.asarray(center_y, np.float64) / config.height  # +1 top, -1 bottom
    semitones = semitones + config.pitch_glide_semitones * rel_height
    return config.pitch_base_hz * 2.0 ** (semitones / 12.0)


# ----------------------------------------------------------------------------- captions


def caption_for(objects) -> str:
    """Caption of (color, shape, motion) triples: 'a red circle moves up and a ...'."""
    parts = []
    for color, shape, motion in objects:
        article = 'an' if color[0] in 'aeiou' else 'a'
        parts.append(f'{article} {color} {shape} {MOTION_PHRASES[motion]}')
    return ' and '.join(parts)


_PHRASE_TO_MOTION = {phrase: motion for motion, phrase in MOTION_PHRASES.items()}
_CLAUSE = re.compile(r'an? (\w+) (\w+) (.+)')
# Clauses are joined by ' and ', which motion phrases also use: split only where a colour follows.
_CLAUSE_BREAK = re.compile(r' and (?=an? (?:%s) )' % '|'.join(COLORS))


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """Inverse of ``caption_for``: list of (color, shape, motion). Raises ValueError if malformed."""
    text = ' '.join(caption.strip().lower().rstrip('.').split())
    objects = []
    for clause in _CLAUSE_BREAK.split(text):
        match = _CLAUSE.fullmatch(clause)
        if (match is None or match[1] not in COLORS or match[2] not in SHAPES
                or match[3] not in _PHRASE_TO_MOTION):
            raise ValueError(f'caption {caption!r}: cannot parse {clause!r}; expected '
                             f'"a/an <colour> <shape> <motion phrase>" joined by " and "')
        objects.append((match[1], match[2], _PHRASE_TO_MOTION[match[3]]))
    return objects


# ----------------------------------------------------------------------------- splits


def is_held_out(color: str, shape: str, motion: str, modulus: int) -> bool:
    """Whether a colour x shape x motion combination belongs to the compositional split only."""
    index = list(COLORS).index(color) + SHAPES.index(shape) + MOTIONS.index(motion)
    return index % modulus == 0


@functools.lru_cache(maxsize=64)
def split_combinations(config: WorldConfig, split: str) -> tuple[tuple[str, str, str], ...]:
    """The (color, shape, motion) combinations objects of ``split`` draw from."""
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is unknown; expected one of {SPLITS}')
    want_held_out = split == 'compositional'
    combos = tuple((c, s, m) for c in config.colors for s in config.shapes for m in config.motions
                   if is_held_out(c, s, m, config.holdout_modulus) == want_held_out)
    if not combos:
        raise ValueError(f'split {split!r} has no colour x shape x motion combinations under this '
                         f'WorldConfig (colors/shapes/motions/holdout_modulus)')
    return combos


# ----------------------------------------------------------------------------- motion


@dataclasses.dataclass(frozen=True)
class _Object:
    color: str
    shape: str
    motion: str
    size: float            # side of the bounding square, px
    start: tuple[float, float]      # centre (y, x) at t = 0, continuous px
    velocity: tuple[float, float]   # (vy, vx), px / s

    def bounds(self, config: WorldConfig) -> np.ndarray:
        """[2 axes, 2] the interval the centre may occupy on each axis."""
        half = self.size / 2
        return np.array([[half, config.height - half], [half, config.width - half]])


def object_positions(obj: _Object, config: WorldConfig, times: np.ndarray) -> np.ndarray:
    """[len(times), 2] continuous centre (y, x) at ``times`` seconds; walls reflect the motion."""
    times = np.asarray(times, np.float64)
    out = np.empty(times.shape + (2,))
    for axis, (low, high) in enumerate(obj.bounds(config)):
        unfolded = obj.start[axis] + obj.velocity[axis] * times
        span = high - low
        phase = np.mod(unfolded - low, 2 * span)
        out[..., axis] = low + span - np.abs(phase - span)
    return out


def wall_contact_times(obj: _Object, config: WorldConfig) -> list[float]:
    """Times in (0, duration) at which the object touches a wall."""
    times = []
    for axis, (low, high) in enumerate(obj.bounds(config)):
        velocity = obj.velocity[axis]
        if velocity == 0:
            continue
        span = high - low
        # Walls sit at low + m * span in unfolded coordinates.
        end = obj.start[axis] + velocity * config.duration
        first, last = sorted(((obj.start[axis] - low) / span, (end - low) / span))
        for m in range(math.floor(first), math.ceil(last) + 1):
            t = (low + m * span - obj.start[axis]) / velocity
            if 1e-9 < t < config.duration:
                times.append(float(t))
    return sorted(times)


def _sample_object(rng, config: WorldConfig, color: str, shape: str, motion: str) -> _Object:
    size = rng.uniform(*config.object_size) * config.frame_size
    speed = 0.0 if motion == 'still' else rng.choice(config.speeds) * config.frame_size
    limits = [(size / 2, config.height - size / 2), (size / 2, config.width - size / 2)]
    duration = config.duration
    if motion == 'bounce':
        axis = int(rng.integers(2))
        sign = 1.0 if rng.integers(2) else -1.0
        low, high = limits[axis]
        earliest = BOUNCE_MARGIN_FRAMES / config.fps
        latest = min((config.num_frames - 1 - BOUNCE_MARGIN_FRAMES) / config.fps,
                     (high - low) / speed)
        contact = rng.uniform(earliest, latest) if latest > earliest else (high - low) / speed
        wall = high if sign > 0 else low
        start = [0.0, 0.0]
        start[axis] = wall - sign * speed * contact
        other = 1 - axis
        start[other] = rng.uniform(*limits[other])
        velocity = [0.0, 0.0]
        velocity[axis] = sign * speed
    else:
        direction = DIRECTIONS[motion]
        velocity = [d * speed for d in direction]
        start = []
        for axis in range(2):
            low, high = limits[axis]
            travel = velocity[axis] * duration
            # Keep the whole path (through the end of the audio) strictly inside the walls.
            lo_start = low + max(0.0, -travel) + 1e-3
            hi_start = high - max(0.0, travel) - 1e-3
            start.append(rng.uniform(lo_start, hi_start))
    return _Object(color, shape, motion, float(size), (float(start[0]), float(start[1])),
                   (float(velocity[0]), float(velocity[1])))


def _overlaps(a: np.ndarray, b: np.ndarray, size_a: float, size_b: float) -> bool:
    """Whether two objects' bounding squares (plus a gap) meet in any frame."""
    reach = (size_a + size_b) / 2 + _GAP_PIXELS
    apart = np.any(np.abs(a - b) >= reach, axis=-1)
    return not bool(np.all(apart))


# ----------------------------------------------------------------------------- rendering


def shape_masks(shape: str, centers: np.ndarray, size: float, height: int, width: int) -> np.ndarray:
    """bool [T, H, W]: pixels whose centre lies inside ``shape`` at each centre [T, 2] (y, x)."""
    centers = np.asarray(centers, np.float64)
    dy = (np.arange(height) + 0.5)[None, :, None] - centers[:, 0, None, None]
    dx = (np.arange(width) + 0.5)[None, None, :] - centers[:, 1, None, None]
    half = size / 2
    if shape == 'circle':
        return dy * dy + dx * dx <= half * half
    if shape == 'square':
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == 'diamond':
        return np.abs(dy) + np.abs(dx) <= half
    if shape == 'triangle':  # apex up, base at the bottom of the bounding square
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f'shape {shape!r} is unknown; expected one of {SHAPES}')


def _background(rng, config: WorldConfig, kind: str) -> np.ndarray:
    """[H, W, 3] uint8 grey background (chroma <= 16)."""
    height, width = config.height, config.width
    grey = rng.uniform(50.0, 170.0)
    tint = rng.uniform(-8.0, 8.0, size=3)
    image = np.full((height, width), grey, np.float32)
    if kind == 'textured':
        # Smooth value noise plus a faint checkerboard, identical in the three channels.
        cells = int(rng.integers(3, 7))
        coarse = rng.uniform(-35.0, 35.0, size=(cells + 1, cells + 1))
        ys = np.linspace(0, cells, height)
        xs = np.linspace(0, cells, width)
        noise = _lerp_matrix(ys, cells) @ coarse @ _lerp_matrix(xs, cells).T   # bilinear
        period = int(rng.integers(3, 9)) * max(1, config.frame_size // 64)
        checker = ((np.arange(height)[:, None] // period + np.arange(width)[None] // period) % 2)
        image = image + noise + 10.0 * (checker - 0.5)
    elif kind != 'plain':
        raise ValueError(f'background {kind!r} is unknown; expected one of {BACKGROUNDS}')
    return np.clip(np.round(image[..., None] + tint), 0, 255).astype(np.uint8)


def _lerp_matrix(points: np.ndarray, cells: int) -> np.ndarray:
    """[len(points), cells + 1] weights of linear interpolation at ``points`` in [0, cells]."""
    return np.maximum(0.0, 1.0 - np.abs(points[:, None] - np.arange(cells + 1)[None]))


def _synthesize_audio(config: WorldConfig, objects, phases, contacts) -> np.ndarray:
    samples = np.arange(config.num_samples)
    # Frequency on a grid of _PHASE_HOP samples, phase integrated there (trapezoid) and interpolated to every
    # sample: the phase is smooth, so this matches per-sample integration to ~1e-6 rad.
    grid = np.arange(0, config.num_samples + _PHASE_HOP, _PHASE_HOP)
    grid_times = grid / config.sample_rate
    audio = np.zeros(config.num_samples, np.float64)
    for obj, phase0 in zip(objects, phases):
        freq = shape_pitch_hz(config, obj.shape, object_positions(obj, config, grid_times)[:, 0])
        steps = (freq[1:] + freq[:-1]) * (np.pi * _PHASE_HOP / config.sample_rate)
        phase = np.interp(samples, grid, np.concatenate([[phase0], phase0 + np.cumsum(steps)]))
        audio += config.tone_amplitude * np.sin(phase)
    fade = max(1, int(_FADE_SECONDS * config.sample_rate))
    ramp = np.linspace(0.0, 1.0, fade)
    audio[:fade] *= ramp
    audio[-fade:] *= ramp[::-1]
    click_len = int(CLICK_SECONDS * config.sample_rate)
    for t_contact in contacts:
        first = int(math.ceil(t_contact * config.sample_rate))
        idx = np.arange(first, min(first + click_len, config.num_samples))
        since = idx / config.sample_rate - t_contact
        audio[idx] += (config.click_amplitude * np.exp(-since / _CLICK_DECAY_SECONDS)
                       * np.sin(2 * np.pi * config.click_hz * since))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- the clip


def _place_objects(rng, config: WorldConfig, split: str, frame_times: np.ndarray):
    """Draws the clip's objects (distinct colours and shapes, combinations allowed in ``split``)
    one at a time, each on a path that never comes within _GAP_PIXELS of those already placed
    and whose wall contacts are _MIN_CLICK_GAP_SECONDS away from theirs (distinct clicks).
    An object that finds no free path after _PLACEMENT_TRIES tries is redrawn with other
    attributes; the clip keeps fewer objects only if every redraw fails too (min_objects > 1
    in a crowded world)."""
    combos = split_combinations(config, split)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects, tracks = [], []
    for _ in range(count):
        free = [c for c in combos if all(c[0] != o.color and c[1] != o.shape for o in objects)]
        for _ in range(_REDRAWS if free else 0):
            attributes = free[int(rng.integers(len(free)))]
            for _ in range(_PLACEMENT_TRIES):
                obj = _sample_object(rng, config, *attributes)
                track = object_positions(obj, config, frame_times)
                clicks = wall_contact_times(obj, config)
                if not any(_overlaps(track, other, obj.size, placed.size)
                           for placed, other in zip(objects, tracks)) and not any(
                               abs(a - b) < _MIN_CLICK_GAP_SECONDS for placed in objects
                               for a in wall_contact_times(placed, config) for b in clicks):
                    objects.append(obj)
                    tracks.append(track)
                    break
            else:
                continue
            break
    return objects, tracks


def generate_clip(config: WorldConfig, split: str, index: int) -> dict:
    """One clip, deterministic in (config, split, index).

    Returns a dict with
      'video'   uint8 [T, H, W, 3];  'audio' float32 [S] in [-1, 1];  'caption' str;
      'control' uint8 [T, H, W, 3], structure only: black background, each object a flat grey
                (later-drawn, nearer objects brighter), no colour;
      per object (N of them, in caption order): 'colors', 'shapes', 'motions' (lists of str),
      'sizes' float32 [N] (px), 'speeds' float32 [N] (px / s), 'centroids' float32 [N, T, 2]
      (mean (y, x) pixel index of the mask), 'boxes' float32 [N, T, 4] (y0, x0, y1, x1; y1/x1
      exclusive), 'masks' bool [N, T, H, W], 'bounce_times' (list per object, seconds),
      'bounce_frames' (list per object, nearest frame index), 'pitch_hz' float32 [N, T];
      'background' str; 'split' str; 'index' int.
    """
    config.validate()
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is unknown; expected one of {SPLITS}')
    if int(index) != index or index < 0:
        raise ValueError(f'index must be a non-negative integer, got {index!r}')
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(config.seed), SPLITS.index(split), int(index)]))

    frame_times = np.arange(config.num_frames) / config.fps
    objects, tracks = _place_objects(rng, config, split, frame_times)

    background_kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    background = _background(rng, config, background_kind)
    phases = rng.uniform(0, 2 * np.pi, size=len(objects))

    num = len(objects)
    shape_thw = (config.num_frames, config.height, config.width)
    masks = np.zeros((num,) + shape_thw, bool)
    video = np.broadcast_to(background, shape_thw + (3,)).copy()
    control = np.zeros(shape_thw, np.uint8)
    grey_step = min(96, 160 // max(1, num - 1))
    for k, (obj, track) in enumerate(zip(objects, tracks)):
        masks[k] = shape_masks(obj.shape, track, obj.size, config.height, config.width)
        video[masks[k]] = COLORS[obj.color]
        control[masks[k]] = 255 - (num - 1 - k) * grey_step

    counts = masks.sum(axis=(2, 3))
    rows = np.arange(config.height, dtype=np.float64)
    cols = np.arange(config.width, dtype=np.float64)
    centroids = np.stack([
        np.einsum('nthw,h->nt', masks, rows) / counts,
        np.einsum('nthw,w->nt', masks, cols) / counts], axis=-1)
    any_row, any_col = masks.any(axis=3), masks.any(axis=2)
    boxes = np.stack([
        any_row.argmax(-1), any_col.argmax(-1),
        config.height - any_row[..., ::-1].argmax(-1), config.width - any_col[..., ::-1].argmax(-1),
    ], axis=-1)

    contacts = [wall_contact_times(o, config) for o in objects]
    audio = _synthesize_audio(config, objects, phases, [t for ts in contacts for t in ts])
    pitch = np.stack([shape_pitch_hz(config, o.shape, tr[:, 0]) for o, tr in zip(objects, tracks)])
    attributes = [(o.color, o.shape, o.motion) for o in objects]
    return {
        'video': video,
        'audio': audio,
        'caption': caption_for(attributes),
        'control': np.repeat(control[..., None], 3, axis=-1),
        'colors': [o.color for o in objects],
        'shapes': [o.shape for o in objects],
        'motions': [o.motion for o in objects],
        'sizes': np.array([o.size for o in objects], np.float32),
        'speeds': np.array([math.hypot(*o.velocity) for o in objects], np.float32),
        'centroids': centroids.astype(np.float32),
        'boxes': boxes.astype(np.float32),
        'masks': masks,
        'bounce_times': contacts,
        'bounce_frames': [sorted({int(round(t * config.fps)) for t in ts}) for ts in contacts],
        'pitch_hz': pitch.astype(np.float32),
        'background': background_kind,
        'split': split,
        'index': int(index),
    }


def measure_throughput(config: WorldConfig, num_clips: int = 64, split: str = 'train') -> dict:
    """Clips per second of ``generate_clip`` in this process (after one warm-up clip)."""
    import time
    generate_clip(config, split, 0)
    start = time.perf_counter()
    for index in range(num_clips):
        generate_clip(config, split, index)
    seconds = time.perf_counter() - start
    return {'name': 'soundshapes_generate', 'height': config.height, 'width': config.width,
            'num_frames': config.num_frames, 'num_clips': num_clips,
            'clips_per_s': num_clips / seconds}
