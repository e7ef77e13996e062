"""The SoundShapes world as an evaluation target: ``videolm eval --config configs/soundshapes.py:64``.

Scores ground-truth clips with the evaluator (caption accuracy, trajectory, temporal consistency,
pitch, onsets, audio-video lag; each cross-modal score next to its shuffled-pair baseline). The
argument is the frame size (``64`` or ``128``).
"""
import ml_collections


def get_config(arg=None):
    size = int(arg or 64)
    config = ml_collections.ConfigDict()
    config.kind = "soundshapes"
    config.world = ml_collections.ConfigDict(dict(
        height=size, width=size, num_frames=17, fps=8.0, sample_rate=16000, min_objects=1, max_objects=2))
    config.eval = ml_collections.ConfigDict(dict(split="validation", num_clips=64, seed=0, through_mp4=False))
    return config
