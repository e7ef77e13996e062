"""Reads a SoundShapes video back from its pixels: objects, colours, shapes, motions, trajectories.

Nothing here looks at a clip's annotations. The analysis knows only the world's definition
(palette, shape set, frame rate): foreground is whatever is strongly coloured (backgrounds are
grey), each foreground pixel takes the nearest palette colour, and each colour present through
most of the clip is one object (colours are unique within a clip). Shape comes from matching the
mask against each shape's template of the same area and centroid, motion from the centroid trajectory, and
wall bounces from turning points of that trajectory (their time found by intersecting the two legs).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage, signal

from videolm.data import soundshapes

# Foreground = chroma (max - min over RGB) at least this; palette colours have >= 140, backgrounds <= 16.
CHROMA_THRESHOLD = 70.0
# An object must be visible in at least this fraction of frames.
MIN_PRESENCE = 0.5
# Motion thresholds as fractions of min(height, width).
STILL_TOLERANCE = 0.06
TURN_PROMINENCE = 0.05
_SHAPE_FRAMES = 6
_LEG_FRAMES = 6


@dataclasses.dataclass
class ObjectTrack:
    """One object recovered from pixels. Per-frame arrays are NaN (or 0 area) where it is absent."""
    color: str
    shape: str
    motion: str
    centroids: np.ndarray     # float32 [T, 2] mean (y, x) pixel index of the mask
    centers: np.ndarray       # float32 [T, 2] continuous centre of the mask's box
    boxes: np.ndarray         # float32 [T, 4] (y0, x0, y1, x1), y1/x1 exclusive
    areas: np.ndarray         # int [T] mask pixels
    shape_scores: dict        # shape -> mean IoU with its template
    bounce_times: list        # seconds

    @property
    def present(self) -> np.ndarray:
        return self.areas > 0

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.motion)


@dataclasses.dataclass
class VideoAnalysis:
    objects: list             # ObjectTrack, ordered by first appearance left to right
    foreground: np.ndarray    # bool [T, H, W]
    labels: np.ndarray        # int8 [T, H, W]: index into config.colors, -1 for background
    object_mask: np.ndarray   # bool [T, H, W]: union of the objects' masks
    colors_per_frame: list    # per frame, the frozenset of colours visible as objects

    @property
    def attributes(self) -> list[tuple[str, str, str]]:
        return [o.attributes for o in self.objects]


def caption_from_analysis(analysis: VideoAnalysis) -> str:
    """The caption the world's grammar gives to what the pixels show ('' if no object is seen)."""
    return soundshapes.caption_for(analysis.attributes)


def _check_video(video: np.ndarray, config: soundshapes.WorldConfig) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f'video must be [T, H, W, 3], got shape {video.shape}')
    if video.shape[1:3] != (config.height, config.width):
        raise ValueError(f'video frames are {video.shape[1]}x{video.shape[2]} but the world is '
                         f'{config.height}x{config.width}; resize first (videolm.media.resize_video)')
    if video.dtype != np.uint8:
        raise ValueError(f'video must be uint8 in [0, 255], got {video.dtype}')
    return video


def analyze_video(video: np.ndarray, config: soundshapes.WorldConfig) -> VideoAnalysis:
    """Recovers the objects of a uint8 [T, H, W, 3] SoundShapes video from its pixels."""
    video = _check_video(video, config)
    num_frames = video.shape[0]
    red, green, blue = (video[..., i] for i in range(3))
    chroma = (np.maximum(np.maximum(red, green), blue).astype(np.int16)
              - np.minimum(np.minimum(red, green), blue))
    foreground = chroma >= CHROMA_THRESHOLD
    palette = config.palette()
    labels = np.full(foreground.shape, -1, np.int8)
    # Nearest palette colour: argmin |p - q|^2 = argmin (|q|^2 - 2 p.q).
    colored = video[foreground].astype(np.float32)
    labels[foreground] = ((palette ** 2).sum(-1) - 2 * colored @ palette.T).argmin(-1)

    # A colour is visible in a frame when its largest connected blob covers a third of the
    # smallest object (a small triangle): compression fringes along edges stay below that.
    smallest = (config.object_size[0] * config.frame_size) ** 2 / 2
    min_pixels = max(3.0, smallest / 3)
    frame_index = np.broadcast_to(np.arange(num_frames)[:, None, None], labels.shape)
    counts = np.bincount(frame_index[foreground] * len(palette) + labels[foreground],
                         minlength=num_frames * len(palette)).reshape(num_frames, len(palette))
    blobs = {}
    for t, c in zip(*np.nonzero(counts >= min_pixels)):
        blob = _largest_component(labels[t] == c)
        if blob.sum() >= min_pixels:
            blobs[t, c] = blob
    visible = np.zeros(counts.shape, bool)                                 # [T, C]
    visible[tuple(np.array(list(blobs), int).reshape(-1, 2).T)] = True
    colors_per_frame = [frozenset(config.colors[c] for c in np.flatnonzero(v)) for v in visible]

    objects = []
    object_mask = np.zeros(foreground.shape, bool)
    for c in np.flatnonzero(visible.mean(0) >= MIN_PRESENCE):
        masks = np.zeros((num_frames,) + video.shape[1:3], bool)
        for t in np.flatnonzero(visible[:, c]):
            masks[t] = blobs[t, c]
        object_mask |= masks
        objects.append(_track(config.colors[c], masks, config))
    objects.sort(key=lambda o: (np.nanmean(o.centroids[:, 1]), np.nanmean(o.centroids[:, 0])))
    return VideoAnalysis(objects, foreground, labels, object_mask, colors_per_frame)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def _track(color: str, masks: np.ndarray, config: soundshapes.WorldConfig) -> ObjectTrack:
    num_frames, height, width = masks.shape
    areas = masks.sum(axis=(1, 2))
    present = areas > 0
    safe = np.maximum(areas, 1)
    centroids = np.full((num_frames, 2), np.nan, np.float32)
    centroids[:, 0] = np.einsum('thw,h->t', masks, np.arange(height, dtype=np.float64)) / safe
    centroids[:, 1] = np.einsum('thw,w->t', masks, np.arange(width, dtype=np.float64)) / safe
    rows, cols = masks.any(2), masks.any(1)
    boxes = np.stack([rows.argmax(1), cols.argmax(1), height - rows[:, ::-1].argmax(1),
                      width - cols[:, ::-1].argmax(1)], -1).astype(np.float32)
    centroids[~present] = np.nan
    boxes[~present] = np.nan
    centers = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)

    scores = _shape_scores(masks, centroids, boxes, present, config)
    shape = max(scores, key=scores.get)
    motion, bounce_times = classify_motion(centroids, config)
    return ObjectTrack(color, shape, motion, centroids, centers, boxes, areas, scores, bounce_times)


@functools.lru_cache(maxsize=None)
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(area / size**2, centroid dy / size, centroid dx / size) of a shape, from a fine rendering."""
    size = 512
    mask = soundshapes.shape_masks(shape, np.array([[size / 2, size / 2]]), size, size, size)[0]
    ys, xs = np.nonzero(mask)
    return mask.mean(), (ys.mean() + 0.5 - size / 2) / size, (xs.mean() + 0.5 - size / 2) / size


def _shape_scores(masks, centroids, boxes, present, config) -> dict:
    """Mean IoU of the mask with each shape's template of the same area and centroid. Area and
    centroid average over the whole mask, so the fit tolerates ragged or blurred edges."""
    height, width = masks.shape[1:]
    inside = present & (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < height) & (
        boxes[:, 3] < width)
    frames = np.flatnonzero(inside if inside.any() else present)
    frames = frames[np.linspace(0, len(frames) - 1, min(_SHAPE_FRAMES, len(frames))).astype(int)]
    scores = {shape: 0.0 for shape in config.shapes}
    for t in frames:
        y0, x0, y1, x1 = boxes[t].astype(int)
        area = masks[t].sum()
        for shape in config.shapes:
            fill, dy, dx = _shape_geometry(shape)
            size = float(np.sqrt(area / fill))
            center = centroids[t] + 0.5 - np.array([dy, dx]) * size      # continuous box centre
            top = max(0, min(y0, int(center[0] - size / 2)) - 1)
            left = max(0, min(x0, int(center[1] - size / 2)) - 1)
            bottom = min(height, max(y1, int(np.ceil(center[0] + size / 2))) + 1)
            right = min(width, max(x1, int(np.ceil(center[1] + size / 2))) + 1)
            crop = masks[t, top:bottom, left:right]
            template = soundshapes.shape_masks(shape, (center - [top, left])[None], size,
                                               *crop.shape)[0]
            union = np.logical_or(template, crop).sum()
            scores[shape] += np.logical_and(template, crop).sum() / max(union, 1) / len(frames)
    return scores


def _fill_gaps(track: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN frames (per axis); [T, 2]."""
    out = np.array(track, np.float64)
    frames = np.arange(len(out))
    for axis in range(out.shape[1]):
        good = np.isfinite(out[:, axis])
        out[:, axis] = np.interp(frames, frames[good], out[good, axis])
    return out


def classify_motion(centroids: np.ndarray, config: soundshapes.WorldConfig):
    """(motion name, bounce times in seconds) from a [T, 2] centroid track (NaN where absent)."""
    track = _fill_gaps(centroids)
    scale = config.frame_size
    if np.max(np.linalg.norm(track - track[0], axis=-1)) < STILL_TOLERANCE * scale:
        return 'still', []
    turns = []
    for axis in range(2):
        position = track[:, axis]
        for sign in (1.0, -1.0):
            peaks, _ = signal.find_peaks(sign * position, prominence=TURN_PROMINENCE * scale)
            turns.extend((int(k), axis) for k in peaks)
    if turns:
        times = sorted(t for k, axis in sorted(turns)
                       for t in [_turn_time(track[:, axis], k, turns, axis)] if t is not None)
        return 'bounce', [t / config.fps for t in times]
    frames = np.arange(len(track))
    velocity = np.array([np.polyfit(frames, track[:, axis], 1)[0] for axis in range(2)])
    angle = np.degrees(np.arctan2(velocity[0], velocity[1]))              # y down: +90 is down
    names = ('right', 'down-right', 'down', 'down-left', 'left', 'up-left', 'up', 'up-right')
    return names[int(np.round(angle / 45.0)) % 8], []


def _turn_time(position: np.ndarray, k: int, turns, axis: int):
    """Contact time (in frames) of the turn at frame k: where the lines through its two legs meet."""
    others = sorted(j for j, a in turns if a == axis and j != k)
    start = max([j for j in others if j < k], default=0)
    end = min([j for j in others if j > k], default=len(position) - 1)
    left = np.arange(max(start, k - _LEG_FRAMES), k)
    right = np.arange(k + 1, min(end, k + _LEG_FRAMES) + 1)
    if len(left) < 2 or len(right) < 2:
        return float(k)
    slope_l, icpt_l = np.polyfit(left, position[left], 1)
    slope_r, icpt_r = np.polyfit(right, position[right], 1)
    if abs(slope_l - slope_r) < 1e-6:
        return float(k)
    meet = (icpt_r - icpt_l) / (slope_l - slope_r)
    return float(np.clip(meet, k - 1, k + 1))
