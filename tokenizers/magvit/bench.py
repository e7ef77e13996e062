"""Speed of the video tokenizer: ``bench(config) -> dict`` (``videolm bench tokenizer``).

Encode (video -> tokens), decode (tokens -> video) and one training step of the configured
objective, on random clips of ``config.data`` size in batches of ``config.bench.batch_size``.
FLOPs are the convolution and matmul FLOPs of the traced programs (``videolm.benchmark.count_flops``;
forward and backward for training), the convention of the PyTorch peer; achieved GFLOP/s are compared with the
f32 matmul peak measured in the same process before and after.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizers.magvit.model import create, tokenizer_from_config
from tokenizers.magvit.train import Trainer
from videolm import benchmark, configlib

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tokenizer_video.py")


def _rates(name: str, flop_count: int, seconds: float, clips: int, peak: float) -> dict:
    return {f"{name}_seconds": seconds,
            f"{name}_gflops": flop_count / 1e9,
            f"{name}_achieved_gflops": flop_count / seconds / 1e9,
            f"{name}_fraction_of_peak": flop_count / seconds / 1e9 / peak,
            f"{name}_clips_per_s": clips / seconds}


def bench(config=None) -> dict:
    """Times encode, decode and train; the result's ``achieved_gflops``/``fraction_of_peak`` are
    the training step's (the peer's convention)."""
    if config is None:
        config = configlib.load_config(f"{os.path.abspath(DEFAULT_CONFIG)}:bench")
    bc, data = config.bench, config.data
    batch = bc.batch_size
    clip = (data.num_frames, data.height, data.width)
    rng = np.random.RandomState(config.seed)
    video_u8 = rng.randint(0, 256, (batch,) + clip + (3,)).astype(np.uint8)
    video = jnp.asarray(video_u8, jnp.float32) / 127.5 - 1.0
    timing = dict(steps=bc.steps, warmup=bc.warmup)

    with benchmark.PeakBracket() as peak:
        tokenizer = create(lambda: tokenizer_from_config(config.model, nnx.Rngs(config.seed)))
        graphdef, params = nnx.split(tokenizer)
        encode = lambda p, v: nnx.merge(graphdef, p).tokenize(v)
        decode = lambda p, t: nnx.merge(graphdef, p).decode_tokens(t)
        encode_jit, decode_jit = jax.jit(encode), jax.jit(decode)
        tokens = encode_jit(params, video)
        encode_flops = benchmark.count_flops(encode, params, video)
        decode_flops = benchmark.count_flops(decode, params, tokens)
        t_enc = benchmark.time_fn(lambda: encode_jit(params, video), **timing)["median_s"]
        t_dec = benchmark.time_fn(lambda: decode_jit(params, tokens), **timing)["median_s"]
        del tokenizer, params

        train_config = config.copy_and_resolve_references()
        with train_config.unlocked():
            train_config.data.batch_size = batch
            train_config.train.crop_size = 0
            train_config.train.crop_frames = 0
        trainer = Trainer(train_config, mesh=None)
        key = jax.random.key(0)
        phase = trainer.phase(trainer.step)
        train_flops = benchmark.count_flops(trainer.step_function(phase), trainer.state, video_u8, key,
                                        trainer.lpips_params)
        t_train = benchmark.time_fn(lambda: trainer.train_step(video_u8, key)["loss"], **timing)["median_s"]
        num_params = sum(x.size for x in jax.tree.leaves(nnx.state(trainer.models().tokenizer, nnx.Param)))

    result = {"benchmark": "tokenizer_video", "variant": config.get("variant", ""),
              "batch_size": batch, "clip_shape": list(clip),
              "token_shape": list(tokens.shape[1:]),
              "params": int(num_params), "conv_impl": config.model.conv_impl}
    result.update(_rates("encode", encode_flops, t_enc, batch, peak.gflops))
    result.update(_rates("decode", decode_flops, t_dec, batch, peak.gflops))
    result.update(_rates("train", train_flops, t_train, batch, peak.gflops))
    result.update({
        "encode_clips_per_s": batch / t_enc,
        "decode_clips_per_s": batch / t_dec,
        "train_steps_per_s": 1.0 / t_train,
        "achieved_gflops": train_flops / t_train / 1e9,
        "peak_gflops": peak.gflops,
        "peak_gflops_start": peak.start,
        "peak_gflops_end": peak.end,
        "fraction_of_peak": train_flops / t_train / 1e9 / peak.gflops,
        "train_with_gan": bool(phase[0]),
        "train_with_perceptual": bool(phase[1] and config.loss.perceptual_weight > 0),
    })
    result.update(benchmark.environment())
    return result
