"""``videolm bench audio_tokenizer --config configs/tokenizer_audio.py:tiny``: codec throughput.

Encode and decode run on ``config.bench.batch_size`` whole clips (2.125 s); the train step is the
trainer's own jitted step for the config (its batch size and crop). FLOPs are counted from the
jaxpr: convolutions and matrix products only, forward and backward, a transposed (input-dilated)
convolution counted without the inserted zeros, and of a ``lax.cond`` its costliest branch (the
discriminator terms, on from ``loss.adversarial_start_step``). Elementwise work, FFTs and the
optimiser are not counted. Throughput is quoted against the f32 matmul peak measured in the
same process before and after.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizers.soundstream import train as ss_train
from tokenizers.soundstream.model import build_codec
from videolm import benchmark, parallel
from videolm.benchmark import count_flops

# ----------------------------------------------------------------------------- inputs


def tone_batch(batch: int, samples: int, sample_rate: int, seed: int = 1) -> np.ndarray:
    """A few random tones plus noise (content does not change CPU speed; keeps losses meaningful)."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    f0 = 110 + 880 * rng.random((batch, 1))
    return (0.5 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.normal(size=(batch, samples))).astype(np.float32)


def _timed(fn, steps, warmup):
    timing = benchmark.time_fn(fn, steps=steps, warmup=warmup)
    return timing["median_s"], timing["times_s"]


# ----------------------------------------------------------------------------- the benchmark


def bench(config) -> dict:
    if config is None:
        raise ValueError("bench audio_tokenizer needs --config (for example configs/tokenizer_audio.py:tiny)")
    ss_train.validate_config(config)
    b = config.bench
    world = ss_train.world_config(config.data)
    rate, clip_samples = world.sample_rate, world.num_samples
    device = jax.devices()[0]
    mesh = parallel.make_mesh({"data": 1}, devices=[device])
    rules = tuple(config.logical_axis_rules)
    result = {"benchmark": "audio_tokenizer", **benchmark.environment()}

    with benchmark.PeakBracket() as peak:
        codec = parallel.create_sharded(lambda: build_codec(config.model, rngs=nnx.Rngs(config.seed)),
                                        mesh, rules)
        graphdef, state = nnx.split(codec)
        audio = jax.device_put(tone_batch(b.batch_size, clip_samples, rate), device)
        audio_seconds = b.batch_size * clip_samples / rate

        def encode(state, x):
            return nnx.merge(graphdef, state).encode(x)

        def decode(state, codes):
            return nnx.merge(graphdef, state).decode(codes)

        encode_jit, decode_jit = jax.jit(encode), jax.jit(decode)
        codes = encode_jit(state, audio)
        enc_s, enc_all = _timed(lambda: encode_jit(state, audio), b.steps, b.warmup)
        dec_s, dec_all = _timed(lambda: decode_jit(state, codes), b.steps, b.warmup)
        decoded_seconds = b.batch_size * codes.shape[1] * codec.hop / rate
        enc_flops, dec_flops = count_flops(encode, state, audio), count_flops(decode, state, codes)

        # The trainer's step (its batch and crop), after the k-means initialisation, with the
        # discriminator on when the config has one.
        train_state_def, train_state = ss_train.create_state(config, mesh)
        batch = jax.device_put(tone_batch(config.data.batch_size, config.data.crop_samples, rate, seed=2),
                               device)
        step_fn = ss_train.make_train_step(config, train_state_def)
        first = int(config.loss.adversarial_start_step)
        with parallel.use_mesh(mesh, rules):
            train_state = jax.jit(ss_train.make_codebook_init(config, train_state_def))(train_state, batch)
            step_jit = jax.jit(step_fn, donate_argnums=0)
            train_state, metrics = step_jit(train_state, batch, jnp.int32(first))
            train_flops = count_flops(step_fn, train_state, batch, jnp.int32(first + 1))
            holder = {"state": train_state, "step": first + 1}

            def one_step():
                holder["state"], m = step_jit(holder["state"], batch, jnp.int32(holder["step"]))
                holder["step"] += 1
                return m["loss"]

            first_loss = float(metrics["loss"])
            train_s, train_all = _timed(one_step, b.train_steps, b.warmup)
            last_loss = float(one_step())

    peak_gflops = peak.gflops
    train_gflops = train_flops / train_s / 1e9
    m = config.model
    result.update({
        "config_channels": m.channels, "config_latent_dim": m.latent_dim, "strides": list(m.strides),
        "hop": codec.hop, "levels": m.num_levels, "codes": m.codebook_size,
        "bench_batch": b.batch_size, "clip_samples": clip_samples, "latent_frames": int(codes.shape[1]),
        "train_batch": config.data.batch_size, "train_crop_samples": config.data.crop_samples,
        "discriminator": ss_train.uses_discriminator(config.loss),
        "encode_seconds_per_s": audio_seconds / enc_s,
        "decode_seconds_per_s": decoded_seconds / dec_s,
        "train_steps_per_s": 1.0 / train_s,
        "encode_seconds": enc_s, "decode_seconds": dec_s, "train_seconds": train_s,
        "encode_seconds_all": enc_all, "decode_seconds_all": dec_all, "train_seconds_all": train_all,
        "encode_gflops_per_audio_second": enc_flops / audio_seconds / 1e9,
        "encode_achieved_gflops": enc_flops / enc_s / 1e9,
        "decode_achieved_gflops": dec_flops / dec_s / 1e9,
        "train_gflops_per_step": train_flops / 1e9,
        "train_loss_first": first_loss, "train_loss_last": last_loss,
        "achieved_gflops": train_gflops,
        "achieved_gflops_mode": "train",
        "peak_gflops": peak_gflops, "peak_gflops_start": peak.start, "peak_gflops_end": peak.end,
        "fraction_of_peak": train_gflops / peak_gflops,
        "encode_fraction_of_peak": enc_flops / enc_s / 1e9 / peak_gflops,
        "decode_fraction_of_peak": dec_flops / dec_s / 1e9 / peak_gflops,
        "flops_method": "jaxpr: conv + dot_general incl. backward; transposed convs without inserted zeros",
    })
    return result
