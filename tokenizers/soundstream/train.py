"""Training the SoundStream audio tokenizer: ``videolm train --config configs/tokenizer_audio.py:tiny``.

Sections: models and optimisers, data, the jitted step (generator and discriminator updates
plus the functional RVQ state update), and the loop (resume, logging, checkpoints).

One step on a batch of random crops ``x`` [B, crop]:

0. For the first ``model.quantizer_warmup_steps`` steps the codec trains as a plain autoencoder
   (the decoder reads the latents unquantised, the codebooks stay put); then k-means initialises
   the RVQ codebooks on the encoder's latents of the first quantised batch and the next
   ``model.kmeans_batches - 1`` ones (``make_codebook_init``; one batch has too few frames per
   code), so the codes start where the trained latents are rather than where random ones were.
1. generator: ``z = enc(x)``; quantise with a random
   number of levels per example (quantizer dropout); ``y = dec(zq)``; loss = mel * multi-scale
   mel loss + l2 * waveform MSE + commitment * commitment loss + adversarial * hinge G loss +
   feature_matching * feature-matching loss (the last two when a discriminator is configured,
   from ``adversarial_start_step`` on). The RVQ EMA / dead-code update uses this step's residuals.
2. discriminator (when the adversarial or feature-matching weight is non-zero, from
   ``adversarial_start_step`` on): hinge D loss on ``x`` vs ``stop_gradient(y)``, averaged over
   every sub-discriminator.
"""
from __future__ import annotations

import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tokenizers import gan
from tokenizers.soundstream import losses
from tokenizers.soundstream.discriminators import Discriminators
from tokenizers.soundstream.model import SoundStream, build_codec
from tokenizers.soundstream.rvq import RVQState
from videolm import checkpoint, configlib, parallel, runlog
from videolm.data.pipeline import make_iterator, make_source
from videolm.data.soundshapes import WorldConfig

CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- models


def uses_discriminator(loss_config) -> bool:
    return loss_config.adversarial_weight > 0 or loss_config.feature_matching_weight > 0


class TrainState(nnx.Module):
    """Everything a step reads and writes: codec, discriminators and both optimisers."""

    def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.codec = build_codec(config.model, rngs=rngs)
        self.g_opt = nnx.Optimizer(self.codec, make_optimizer(config.train, config.train.learning_rate),
                                   wrt=nnx.Param)
        self.disc = nnx.data(None)
        self.d_opt = nnx.data(None)
        if uses_discriminator(config.loss):
            d = config.discriminator
            self.disc = Discriminators(
                stft_channels=d.stft_channels, stft_n_fft=d.stft_n_fft, stft_hop=d.stft_hop,
                stft_channel_mults=tuple(d.stft_channel_mults), wave_scales=d.wave_scales,
                wave_channels=d.wave_channels, wave_downsamples=d.wave_downsamples,
                wave_max_channels=d.wave_max_channels, rngs=rngs)
            self.d_opt = nnx.Optimizer(self.disc, make_optimizer(config.train, config.train.disc_learning_rate),
                                       wrt=nnx.Param)


def make_optimizer(train_config, peak_lr: float) -> optax.GradientTransformation:
    """Adam(b1, b2) with linear warm-up then cosine decay to 10%, after global-norm clipping."""
    warmup = max(min(train_config.warmup_steps, train_config.num_steps - 1), 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, warmup, max(train_config.num_steps, warmup + 1), end_value=0.1 * peak_lr)
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip),
                       optax.adam(schedule, b1=train_config.b1, b2=train_config.b2))


def validate_config(config) -> None:
    """Raises ValueError naming the first setting this trainer cannot use."""
    m, d, t = config.model, config.data, config.train
    hop = int(np.prod(m.strides))
    if d.crop_samples % hop or d.crop_samples < hop:
        raise ValueError(f"data.crop_samples={d.crop_samples} must be a positive multiple of the hop "
                         f"{hop} (product of model.strides {tuple(m.strides)})")
    if d.crop_samples > world_config(d).num_samples:
        raise ValueError(f"data.crop_samples={d.crop_samples} exceeds the clip length "
                         f"{world_config(d).num_samples}")
    if not 0.0 <= m.quantizer_dropout <= 1.0:
        raise ValueError(f"model.quantizer_dropout must be in [0, 1], got {m.quantizer_dropout}")
    for name in ("num_steps", "log_every", "checkpoint_every"):
        if t[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
    # The EMA count of a code is its average number of assignments per step; with N frames per
    # step and K codes a code in average use has N / K. A threshold near that restarts codes in
    # ordinary use every step (codebook churn) instead of the ones that went unused.
    mean_count = d.batch_size * (d.crop_samples // hop) / m.codebook_size
    if m.dead_code_threshold > 0.5 * mean_count:
        raise ValueError(f"model.dead_code_threshold={m.dead_code_threshold} must be at most half the average "
                         f"EMA count of a code, {mean_count:.3g} (= data.batch_size * crop_samples / hop / "
                         f"codebook_size): codes in ordinary use would be restarted")
    if max(config.loss.mel_scales) > d.crop_samples:
        raise ValueError(f"loss.mel_scales up to {max(config.loss.mel_scales)} exceed data.crop_samples "
                         f"{d.crop_samples}")
    losses.mels_per_scale(config.loss.mel_scales, config.loss.num_mels)


# ----------------------------------------------------------------------------- data


def world_config(data_config) -> WorldConfig:
    w = data_config.world
    return WorldConfig(height=w.height, width=w.width, num_frames=w.num_frames, fps=w.fps,
                       sample_rate=w.sample_rate)


class RandomAudioCrop(grain.transforms.RandomMap):
    """Keeps only ``audio``, cut to a random window of ``crop_samples`` (deterministic per seed).

    With probability ``transient_fraction`` the window is placed around a random transient (a
    sample whose first difference exceeds ``transient_threshold``: SoundShapes' clicks, which are
    ~0.1% of the audio and so almost never seen in uniform crops), when the clip has one.
    """

    def __init__(self, crop_samples: int, transient_fraction: float = 0.0, transient_threshold: float = 0.25):
        self.crop_samples = crop_samples
        self.transient_fraction = transient_fraction
        self.transient_threshold = transient_threshold

    def random_map(self, element, rng: np.random.Generator):
        audio = np.asarray(element["audio"], np.float32)
        last = audio.shape[0] - self.crop_samples
        start = int(rng.integers(0, last + 1))
        if self.transient_fraction > 0 and rng.random() < self.transient_fraction:
            transients = np.flatnonzero(np.abs(np.diff(audio)) > self.transient_threshold)
            if transients.size:
                at = int(transients[rng.integers(transients.size)])
                # the transient anywhere in the window but its last eighth (its decay stays inside)
                lo, hi = at - self.crop_samples * 7 // 8, at
                start = int(np.clip(rng.integers(lo, hi + 1), 0, last))
        return {"audio": audio[start:start + self.crop_samples]}


def audio_source(data_config, split: str, num_examples: int):
    return make_source(data_config.dataset, split, data_dir=data_config.data_dir or None,
                       world=world_config(data_config), num_examples=num_examples)


def train_iterator(config):
    d = config.data
    source = audio_source(d, "train", d.num_train_examples)
    return make_iterator(source, batch_size=d.batch_size // jax.process_count(), seed=config.seed,
                         transform=RandomAudioCrop(d.crop_samples, d.get("transient_fraction", 0.0)))


# ----------------------------------------------------------------------------- the step


def _adversarial_terms(disc, real, fake):
    """(hinge G loss, feature-matching loss), averaged over the sub-discriminators."""
    fake_out, real_out = disc(fake), disc(real)
    adv = sum(gan.hinge_g_loss(f[0]) for f in fake_out) / len(fake_out)
    fm = sum(gan.feature_matching_loss(r[1], f[1]) for r, f in zip(real_out, fake_out)) / len(fake_out)
    return adv, fm


def _disc_loss(disc, real, fake):
    real_out, fake_out = disc(real), disc(fake)
    return sum(gan.hinge_d_loss(r[0], f[0]) for r, f in zip(real_out, fake_out)) / len(real_out)


def make_train_step(config, graphdef):
    """``step(state, audio, step_index) -> (state, metrics)``: a pure function of an nnx State.

    Before ``loss.adversarial_start_step`` the discriminator terms and update are skipped by a
    ``lax.cond`` (no compute); from then on they run every step.
    """
    loss_cfg, model_cfg = config.loss, config.model
    sample_rate = config.data.world.sample_rate
    use_disc = uses_discriminator(loss_cfg)
    base_key = jax.random.key(config.seed)
    num_levels = model_cfg.num_levels

    def step(state, audio, step_index):
        ts = nnx.merge(graphdef, state)
        codec: SoundStream = ts.codec
        keys = jax.random.split(jax.random.fold_in(base_key, step_index), 3)
        batch = audio.shape[0]
        dropped = jax.random.uniform(keys[0], (batch,)) < model_cfg.quantizer_dropout
        active = jnp.where(dropped, jax.random.randint(keys[1], (batch,), 1, num_levels + 1), num_levels)
        adversarial_on = step_index >= loss_cfg.adversarial_start_step
        quantize = step_index >= model_cfg.quantizer_warmup_steps

        g_def, g_params, g_rest = nnx.split(codec, nnx.Param, ...)
        if use_disc:
            d_def, d_state = nnx.split(ts.disc)

        def g_loss_fn(params):
            # Fresh variables at this trace level: the RVQ state is written inside.
            model = nnx.merge(g_def, params, jax.tree.map(lambda v: v, g_rest))
            latents = model.encoder(audio)
            q = model.quantizer(latents, active)
            old_rvq = nnx.state(model, RVQState)
            rvq_stats = model.quantizer.update(q.residuals, q.codes, keys[2])
            # Warm-up: the decoder reads the latents unquantised and the codebooks stay put.
            nnx.update(model, jax.tree.map(lambda new, old: jnp.where(quantize, new, old),
                                           nnx.state(model, RVQState), old_rvq))
            recon = model.decoder(jnp.where(quantize, q.quantized, latents))
            commitment = jnp.where(quantize, q.commitment_loss, 0.0)
            mel = losses.multiscale_mel_loss(audio, recon, sample_rate=sample_rate,
                                             scales=tuple(loss_cfg.mel_scales), num_mels=loss_cfg.num_mels,
                                             floor_db=loss_cfg.floor_db)
            l2 = jnp.mean(jnp.square(recon - audio))
            loss = loss_cfg.mel_weight * mel + loss_cfg.l2_weight * l2 + loss_cfg.commitment_weight * commitment
            metrics = {"mel_loss": mel, "l2_loss": l2, "commitment_loss": commitment,
                       # 1.0 for silence, 0.0 for a perfect copy
                       "relative_l2": l2 / jnp.maximum(jnp.mean(jnp.square(audio)), 1e-8)}
            if use_disc:
                adv, fm = jax.lax.cond(
                    adversarial_on,
                    lambda r: _adversarial_terms(nnx.merge(d_def, d_state), audio, r),
                    lambda r: (jnp.float32(0.0), jnp.float32(0.0)), recon)
                loss = loss + loss_cfg.adversarial_weight * adv + loss_cfg.feature_matching_weight * fm
                metrics.update(g_adversarial_loss=adv, feature_matching_loss=fm)
            residual_power = jnp.mean(jnp.square(q.residuals), axis=(1, 2, 3))
            for level in range(num_levels):
                metrics[f"restarted_codes_l{level}"] = rvq_stats["restarted"][level]
                metrics[f"batch_usage_l{level}"] = rvq_stats["batch_usage"][level]
                metrics[f"residual_power_l{level}"] = residual_power[level]
            metrics["loss"] = loss
            return loss, (metrics, nnx.state(model, RVQState), recon)

        (_, (metrics, rvq_state, recon)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
        nnx.update(codec, rvq_state)
        metrics["g_grad_norm"] = optax.global_norm(grads)
        ts.g_opt.update(codec, grads)

        if use_disc:
            fake = jax.lax.stop_gradient(recon)
            do_def, do_state = nnx.split((ts.disc, ts.d_opt))

            def d_update(pair_state):
                disc, opt = nnx.merge(do_def, pair_state)
                d_params_def, d_params, d_rest = nnx.split(disc, nnx.Param, ...)

                def d_loss_fn(params):
                    return _disc_loss(nnx.merge(d_params_def, params, d_rest), audio, fake)

                d_loss, d_grads = jax.value_and_grad(d_loss_fn)(d_params)
                opt.update(disc, d_grads)
                return nnx.state((disc, opt)), d_loss

            new_pair, d_loss = jax.lax.cond(adversarial_on, d_update,
                                            lambda st: (st, jnp.float32(0.0)), do_state)
            nnx.update((ts.disc, ts.d_opt), new_pair)
            metrics["d_loss"] = d_loss
        return nnx.state(ts), metrics

    return step


def make_codebook_init(config, graphdef):
    """``init(state, audio) -> state``: k-means codebooks from the encoder latents of ``audio``
    (a no-op once the quantiser is initialised)."""
    key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)   # apart from the step keys

    def init(state, audio):
        ts = nnx.merge(graphdef, state)
        ts.codec.quantizer.initialize(ts.codec.encoder(audio), key)
        return nnx.state(ts)

    return init


# ----------------------------------------------------------------------------- the loop


def _state_dict(state):
    return nnx.to_pure_dict(state)


def _ctor(config):
    return lambda: TrainState(config, nnx.Rngs(config.seed))


def create_state(config, mesh):
    """The initial TrainState, created sharded over ``mesh``; returns (graphdef, state)."""
    ts = parallel.create_sharded(_ctor(config), mesh, tuple(config.logical_axis_rules))
    return nnx.split(ts)


def restore_or_create_state(config, mesh, ckpt: checkpoint.Checkpointer, data):
    """(graphdef, state, step): the latest checkpoint of ``ckpt`` restored straight into its
    sharded layout (and ``data`` rewound with it), or a fresh state at step 0."""
    if ckpt.latest_step() is None:
        return (*create_state(config, mesh), 0)
    graphdef, abstract = parallel.abstract_state(_ctor(config), mesh, tuple(config.logical_axis_rules))
    restored, meta = ckpt.restore(_state_dict(abstract), data_iterator=data)
    nnx.replace_by_pure_dict(abstract, restored)
    return graphdef, abstract, int(meta["step"])


_JIT_CACHE: dict = {}


def jitted_train_step(config, graphdef, state, mesh):
    """The jitted step for ``config`` on ``mesh`` (state donated); one compilation per process."""
    return _jitted("step", config, graphdef, state, mesh)


def jitted_codebook_init(config, graphdef, state, mesh):
    return _jitted("init", config, graphdef, state, mesh)


def _jitted(kind, config, graphdef, state, mesh):
    key = (kind, config.to_json_best_effort(sort_keys=True), repr(mesh))
    if key not in _JIT_CACHE:
        rules = tuple(config.logical_axis_rules)
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
        audio_sharding = parallel.batch_sharding(mesh, rules, 2)
        if kind == "step":
            _JIT_CACHE[key] = jax.jit(make_train_step(config, graphdef), donate_argnums=0,
                                      in_shardings=(state_sharding, audio_sharding, None),
                                      out_shardings=(state_sharding, None))
        else:
            _JIT_CACHE[key] = jax.jit(make_codebook_init(config, graphdef), donate_argnums=0,
                                      in_shardings=(state_sharding, audio_sharding),
                                      out_shardings=state_sharding)
    return _JIT_CACHE[key]


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains until ``config.train.num_steps`` (resuming from ``workdir``); returns the last metrics."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    configlib.save_config(config, os.path.join(workdir, CONFIG_FILE))
    rules = tuple(config.logical_axis_rules)
    mesh = parallel.make_mesh(dict(config.mesh))
    dp = parallel.data_parallel_size(mesh, rules)
    if config.data.batch_size % dp:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by the {dp}-way "
                         f"data parallelism of mesh {dict(mesh.shape)}")
    t = config.train
    data = train_iterator(config)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=t.keep_checkpoints)
    graphdef, state, start = restore_or_create_state(config, mesh, ckpt, data)
    with parallel.use_mesh(mesh, rules):
        step_fn = jitted_train_step(config, graphdef, state, mesh)
    metrics = {}
    started = time.perf_counter()
    time_limit = float(t.get("max_train_seconds", 0.0))
    with runlog.RunLog(workdir, total_steps=t.num_steps, initial_step=start, desc="audio tokenizer") as log:
        step = start
        while step < t.num_steps:
            batch = parallel.shard_batch(next(data), mesh, rules)
            with parallel.use_mesh(mesh, rules):
                if step == config.model.quantizer_warmup_steps:
                    init_audio = jnp.concatenate(
                        [batch["audio"]] + [parallel.shard_batch(next(data), mesh, rules)["audio"]
                                            for _ in range(config.model.get("kmeans_batches", 1) - 1)])
                    state = jitted_codebook_init(config, graphdef, state, mesh)(state, init_audio)
                state, metrics = step_fn(state, batch["audio"], jnp.int32(step))
            step += 1
            log.advance()
            out_of_time = time_limit > 0 and time.perf_counter() - started > time_limit
            if step % t.log_every == 0 or step == t.num_steps or out_of_time:
                values = jax.device_get(metrics)
                values["seconds"] = time.perf_counter() - started
                log.scalars(step, values)
            if step % t.checkpoint_every == 0 or step == t.num_steps or out_of_time:
                runlog.check_finite({"loss": float(metrics["loss"])}, step)
                ckpt.save(step, _state_dict(state), data_iterator=data,
                          metadata={"kind": config.kind, "config": configlib.config_to_dict(config)})
            if out_of_time:
                log.print(f"stopping at step {step}: train.max_train_seconds={time_limit:g} reached")
                break
    ckpt.close()
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
