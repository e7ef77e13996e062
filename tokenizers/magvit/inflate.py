"""Inflating the 2D image tokenizer into the 3D video tokenizer (MAGVIT-v2's initialisation).

The image stage is the same network with 1-frame temporal kernels and no temporal downsampling
(``configs/tokenizer_video.py:*_image``). Inflation copies every parameter into the 3D model:

* a [1, kh, kw, in, out] kernel goes into the LAST temporal slice of the [kt, kh, kw, in, out]
  kernel and the other slices are zero, so on a video whose frames are all equal the inflated
  model computes what the image model computes per frame, and an image (a 1-frame video) gives the
  image model's tokens exactly;
* a depth-to-space upsampler that gains a temporal factor s_t has s_t times more output channels,
  laid out (s_t, s_h, s_w, C); the 2D weights are repeated for each of the s_t output frames;
* everything else (norms, biases of unchanged shape, 1x1x1 convs) is copied as is.

The discriminator is not inflated: it starts fresh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _plan(image_shape: tuple[int, ...], video_shape: tuple[int, ...], path: str) -> tuple[int, bool]:
    """(output-channel repeat factor, whether to place the kernel in the last temporal slice)."""
    if image_shape == video_shape:
        return 1, False
    if len(image_shape) != len(video_shape):
        raise ValueError(f"inflate: {path} has rank {len(image_shape)} in the image model, "
                         f"{len(video_shape)} in the video model")
    factor, rem = divmod(video_shape[-1], image_shape[-1])
    if rem or factor < 1:
        raise ValueError(f"inflate: {path} output channels {image_shape[-1]} -> {video_shape[-1]} "
                         f"is not a whole temporal factor")
    to_time = len(image_shape) == 5 and image_shape[0] != video_shape[0]
    if to_time and image_shape[0] != 1:
        raise ValueError(f"inflate: {path} has temporal kernel {image_shape[0]}; expected 1 in the image model")
    expected = ((video_shape[0],) if to_time else image_shape[:1]) + image_shape[1:-1] + (image_shape[-1] * factor,)
    if len(image_shape) == 1:
        expected = (image_shape[0] * factor,)
    if expected != tuple(video_shape):
        raise ValueError(f"inflate: {path} has shape {image_shape} in the image model, which does not "
                         f"inflate to {tuple(video_shape)}")
    return factor, to_time


def inflate_array(image_value: jax.Array, video_shape: tuple[int, ...], path: str = "parameter") -> jax.Array:
    """Maps one image-stage parameter to the video model's shape (see the module docstring)."""
    value = jnp.asarray(image_value)
    factor, to_time = _plan(tuple(value.shape), tuple(video_shape), path)
    if factor > 1:
        value = jnp.concatenate([value] * factor, axis=-1)
    if to_time:
        value = jnp.zeros(video_shape, value.dtype).at[-1].set(value[0])
    return value


def inflate_params(image_params: nnx.State, video_model: nnx.Module) -> None:
    """Sets the parameters of ``video_model`` (in place) from the image model's parameters; every
    shape is checked before anything changes."""
    image_flat = dict(nnx.to_flat_state(image_params))
    video_flat = list(nnx.to_flat_state(nnx.state(video_model, nnx.Param)))
    missing = ["/".join(map(str, path)) for path, _ in video_flat if path not in image_flat]
    if missing:
        raise ValueError(f"inflate: the image model lacks {len(missing)} parameters of the video model, "
                         f"e.g. {missing[:3]}; were both built with the same channels and levels?")
    for path, var in video_flat:
        _plan(tuple(image_flat[path].shape), tuple(var.shape), "/".join(map(str, path)))
    new_flat = []
    for path, var in video_flat:
        image_value = image_flat[path]
        image_value = image_value[...] if isinstance(image_value, nnx.Variable) else image_value
        value = inflate_array(image_value, tuple(var.shape), "/".join(map(str, path)))
        new_flat.append((path, var.replace(value.astype(var.dtype))))
    nnx.update(video_model, nnx.from_flat_state(new_flat))
