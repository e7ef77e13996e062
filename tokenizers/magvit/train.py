"""Training the MAGVIT-v2 video tokenizer: ``train(config, workdir)``.

One readable loop in four parts: data, state (tokenizer + EMA + discriminator and both
optimizers, created sharded on the config's mesh), the jitted steps, and the loop (logging,
NaN checks, checkpoints, resume).

The generator and the discriminator update in the same jitted step (the discriminator sees the
reconstruction the generator just produced). The adversarial and perceptual terms switch on at
``loss.gan_start_step`` and ``loss.perceptual_start_step``; before that a cheaper program without
them runs (each phase is compiled once), and the discriminator starts learning with the GAN term.
"""
from __future__ import annotations

import dataclasses
import functools
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
from tokenizers.magvit import inflate, losses
from tokenizers.magvit.api import CONFIG_FILE, load_tokenizer_params
from tokenizers.magvit.discriminator import discriminator_from_config
from tokenizers.magvit.model import compute_dtype, create, tokenizer_from_config
from videolm import checkpoint, configlib, parallel, runlog
from videolm.data.pipeline import make_iterator, make_source
from videolm.data.soundshapes import WorldConfig



# ------------------------------------------------------------------------------------------ data


def world_config(data_config) -> WorldConfig:
    return WorldConfig(height=data_config.height, width=data_config.width,
                       num_frames=data_config.num_frames, fps=data_config.fps)


class RandomClipCrop(grain.transforms.RandomMap):
    """Keeps the video of an example and cuts a random window of ``frames`` frames (0: all) and a
    random ``size`` x ``size`` square (0: full frames). Deterministic per (seed, position)."""

    def __init__(self, frames: int, size: int):
        self.frames, self.size = frames, size

    def random_map(self, example, rng: np.random.Generator):
        video = example["video"]
        t, h, w = video.shape[:3]
        if self.frames:
            if self.frames > t:
                raise ValueError(f"train.crop_frames={self.frames} exceeds the clip's {t} frames")
            start = rng.integers(0, t - self.frames + 1)
            video = video[start:start + self.frames]
        if self.size:
            if self.size > min(h, w):
                raise ValueError(f"train.crop_size={self.size} exceeds the frame size {h}x{w}")
            y, x = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
            video = video[:, y:y + self.size, x:x + self.size]
        return {"video": np.ascontiguousarray(video)}


def make_source_for(data_config, split: str, num_examples: int):
    return make_source(data_config.dataset, split, data_dir=data_config.data_dir or None,
                       world=world_config(data_config) if not data_config.data_dir else None,
                       num_examples=num_examples)


def train_iterator(config, process_batch: int):
    source = make_source_for(config.data, "train", config.data.num_train_examples)
    crop = RandomClipCrop(config.train.crop_frames, config.train.crop_size)
    return make_iterator(source, batch_size=process_batch, seed=config.seed, transform=crop,
                         read_threads=config.data.read_threads)


def to_float_video(video: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> f32 in [-1, 1]."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def to_uint8_video(video) -> np.ndarray:
    return np.asarray(jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5)).astype(np.uint8)


# ----------------------------------------------------------------------------------------- state


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to ``end_learning_rate_ratio`` of it."""
    warmup = max(train_config.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_config.learning_rate,
        warmup_steps=warmup, decay_steps=max(train_config.num_steps, warmup + 1),
        end_value=train_config.learning_rate * train_config.end_learning_rate_ratio)


# Optimizers are cached by their settings so that equal configs give equal (hashable) model
# graphs: trainers of the same model then share compiled steps (a resumed run does not recompile).
@functools.cache
def _scheduled_adam(learning_rate, warmup_steps, num_steps, end_ratio, b1, b2, clip):
    schedule = learning_rate_schedule(ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, warmup_steps=warmup_steps, num_steps=num_steps,
        end_learning_rate_ratio=end_ratio)))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule, b1=b1, b2=b2))


@functools.cache
def _constant_adam(learning_rate, b1, b2, clip):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate, b1=b1, b2=b2))


def generator_tx(tc) -> optax.GradientTransformation:
    """Adam(b1, b2) with warm-up and cosine decay, after global-norm clipping."""
    return _scheduled_adam(tc.learning_rate, tc.warmup_steps, tc.num_steps, tc.end_learning_rate_ratio,
                           tc.b1, tc.b2, tc.grad_clip_norm)


def discriminator_tx(tc) -> optax.GradientTransformation:
    """Adam(b1, b2) at a constant rate, after global-norm clipping."""
    return _constant_adam(tc.disc_learning_rate, tc.b1, tc.b2, tc.grad_clip_norm)


class TrainModels(nnx.Module):
    """Everything a step updates, as one NNX tree (split once, merged inside the jitted step)."""

    def __init__(self, config, rngs: nnx.Rngs):
        self.tokenizer = tokenizer_from_config(config.model, rngs)
        self.gen_opt = nnx.Optimizer(self.tokenizer, generator_tx(config.train), wrt=nnx.Param)
        # EMA of the generator (a copy of the tokenizer whose weights are averaged, never trained).
        self.ema = nnx.clone(self.tokenizer)
        self.discriminator = discriminator_from_config(
            config.discriminator, conv_impl=config.model.conv_impl,
            dtype=compute_dtype(config.model.dtype), rngs=rngs)
        self.disc_opt = nnx.Optimizer(self.discriminator, discriminator_tx(config.train), wrt=nnx.Param)
        self.lecam = gan.lecam_init()


def update_ema(models: TrainModels, step, decay: float) -> None:
    """EMA of the tokenizer's weights with warm-up: rate min(decay, (1 + step) / (10 + step))."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    params = nnx.state(models.tokenizer, nnx.Param)
    averaged = nnx.state(models.ema, nnx.Param)
    new = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, averaged, params)
    nnx.update(models.ema, new)


# ----------------------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: losses.LossConfig
    ema_decay: float
    with_gan: bool
    with_perceptual: bool = True


def train_step(graphdef, state, video_uint8, rng, lpips_params, *, cfg: StepConfig, lpips_apply=None):
    """One generator (+ discriminator) update. Pure: (state, batch, rng) -> (state, metrics)."""
    models = nnx.merge(graphdef, state)
    step = models.gen_opt.step[...]
    video = to_float_video(video_uint8)
    rng_frames = jax.random.fold_in(rng, step)
    lpips_fn = None
    if lpips_apply is not None and cfg.loss.perceptual_weight > 0 and cfg.with_perceptual:
        lpips_fn = lambda x, y: lpips_apply(lpips_params, x, y)
    disc = models.discriminator if cfg.with_gan else None

    def gen_loss(tokenizer):
        return losses.generator_loss(tokenizer, video, step=step, rng=rng_frames, cfg=cfg.loss,
                                     lpips_fn=lpips_fn, discriminator=disc)

    (_, (metrics, recon)), grads = nnx.value_and_grad(gen_loss, has_aux=True)(models.tokenizer)
    metrics["grad_norm"] = optax.tree.norm(grads)
    models.gen_opt.update(models.tokenizer, grads)
    update_ema(models, step, cfg.ema_decay)

    if cfg.with_gan:
        apply_r1 = (step % cfg.loss.r1_every) == 0

        def disc_loss(discriminator):
            return losses.discriminator_loss(discriminator, video, recon, models.lecam[...], cfg=cfg.loss,
                                             apply_r1=apply_r1)

        (_, (d_metrics, anchors)), d_grads = nnx.value_and_grad(disc_loss, has_aux=True)(models.discriminator)
        models.disc_opt.update(models.discriminator, d_grads)
        models.lecam.set_value(anchors)
        metrics.update(d_metrics)
        metrics["disc_grad_norm"] = optax.tree.norm(d_grads)
    return nnx.state(models), metrics


_STEP_CACHE: dict = {}


def mesh_from_config(mesh_config) -> jax.sharding.Mesh:
    """The config's mesh; sizes without a -1 use the first ``data * fsdp * tensor`` devices."""
    sizes = dict(mesh_config)
    if -1 not in sizes.values():
        count = int(np.prod(list(sizes.values())))
        if count > jax.device_count():
            raise ValueError(f"mesh {sizes} needs {count} devices, but {jax.device_count()} are available")
        return parallel.make_mesh(sizes, devices=jax.devices()[:count])
    return parallel.make_mesh(sizes)


class Trainer:
    """Builds the sharded state and the compiled steps for a config (used by train, bench, tests)."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        self.config = config
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.mesh = mesh if mesh is not None else mesh_from_config(config.mesh)
        self.loss_cfg = losses.LossConfig.from_config(config.loss, config.lfq)
        dp = parallel.data_parallel_size(self.mesh, self.rules)
        if config.data.batch_size % dp:
            raise ValueError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                             f"{dp} data-parallel devices of mesh {dict(config.mesh)}")
        models = create(lambda: TrainModels(config, nnx.Rngs(config.seed)), mesh=self.mesh, rules=self.rules)
        self.graphdef, self.state = nnx.split(models)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.lpips = None
        if self.loss_cfg.perceptual_weight > 0:
            from videolm.eval import perceptual
            self.lpips = perceptual.lpips_vgg()

    @property
    def step(self) -> int:
        """The number of generator updates so far (from the optimizer's counter)."""
        return int(self.state["gen_opt"]["step"][...])

    def models(self) -> TrainModels:
        return nnx.merge(self.graphdef, self.state)

    def set_models(self, models: TrainModels) -> None:
        _, state = nnx.split(models)
        self.state = jax.device_put(state, self.state_shardings)

    def phase(self, step: int) -> tuple[bool, bool]:
        """(with_gan, with_perceptual) at ``step``: the terms switched on by then."""
        return step >= self.loss_cfg.gan_start_step, step >= self.loss_cfg.perceptual_start_step

    def _step_config(self, phase: tuple[bool, bool]) -> StepConfig:
        # Switch-on steps are decided outside the step: leave them out of the compiled program's key.
        loss = dataclasses.replace(self.loss_cfg, gan_start_step=0, perceptual_start_step=0)
        return StepConfig(loss=loss, ema_decay=self.config.train.ema_decay, with_gan=phase[0],
                          with_perceptual=phase[1])

    def step_function(self, phase: tuple[bool, bool]):
        """The pure step ``(state, video_uint8, rng, lpips_params) -> (state, metrics)`` (not jitted)
        for a phase ``(with_gan, with_perceptual)``."""
        cfg = self._step_config(phase)
        return functools.partial(train_step, self.graphdef, cfg=cfg,
                                 lpips_apply=self.lpips.apply_fn if self.lpips else None)

    @property
    def lpips_params(self):
        return self.lpips.params if self.lpips else None

    def step_fn(self, phase: tuple[bool, bool]):
        """The jitted step of a phase (the state is donated). Trainers of the same model, objective
        and mesh share one compiled program (a resumed run in the same process does not recompile)."""
        key = (self.graphdef, self._step_config(phase), self.lpips is not None, self.mesh, self.rules)
        if key not in _STEP_CACHE:
            batch_sharding = parallel.batch_sharding(self.mesh, self.rules, 5)
            _STEP_CACHE[key] = jax.jit(
                self.step_function(phase), in_shardings=(self.state_shardings, batch_sharding, None, None),
                out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        return _STEP_CACHE[key]

    def train_step(self, video_uint8, rng):
        """Runs one step on a host batch; returns the metrics (device arrays)."""
        phase = self.phase(self.step)
        with parallel.use_mesh(self.mesh, self.rules):
            video = jax.device_put(np.asarray(video_uint8), parallel.batch_sharding(self.mesh, self.rules, 5))
            self.state, metrics = self.step_fn(phase)(self.state, video, rng, self.lpips_params)
        return metrics


# ------------------------------------------------------------------------------------------ loop


IMAGE_STAGE_DIR = "image_stage"
IMAGE_STAGE_DONE = "done.json"


def image_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The 2D stage of a video run: the same network and data with 1-frame temporal kernels and no
    temporal downsampling, trained on single random frames at ``init.image_stage.batch_multiplier``
    times the batch, for ``init.image_stage.num_steps`` steps (or ``time_limit_s`` seconds)."""
    stage_spec = config.init.image_stage
    if stage_spec.batch_multiplier < 1:
        raise ValueError(f"init.image_stage.batch_multiplier must be >= 1, got {stage_spec.batch_multiplier}")
    stage = ml_collections.ConfigDict(config.to_dict())
    stage.variant = f"{config.get('variant', 'video')}_image"
    stage.model.update(temporal_kernel=1, temporal_downsample=(False,) * len(config.model.temporal_downsample))
    stage.data.update(batch_size=config.data.batch_size * stage_spec.batch_multiplier)
    stage.train.update(crop_frames=1, num_steps=stage_spec.num_steps, time_limit_s=stage_spec.time_limit_s,
                       video_every=0)
    stage.loss.update(perceptual_frames=0)
    stage.eval.update(fvd=False, first_frame=False)
    stage.init.image_workdir = ""
    stage.init.image_stage.num_steps = 0
    return stage


def train_image_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains the image stage of ``config`` in ``workdir/image_stage`` unless it finished there
    before (a resumed run does not train it again); returns its workdir."""
    stage_dir = os.path.join(workdir, IMAGE_STAGE_DIR)
    done = os.path.join(stage_dir, IMAGE_STAGE_DONE)
    if not os.path.exists(done):
        configlib.write_json(done, {"last": train(image_stage_config(config), stage_dir)})
    return stage_dir


def init_from_image_stage(trainer: Trainer, image_workdir: str) -> None:
    """Inflates the EMA weights of a trained image-stage run into the trainer's tokenizer."""
    image_config, image_params = load_tokenizer_params(image_workdir, use_ema=True)
    if image_config.model.temporal_kernel != 1:
        raise ValueError(f"init.image_workdir={image_workdir!r} is not an image-stage run (temporal_kernel "
                         f"{image_config.model.temporal_kernel}, expected 1)")
    models = trainer.models()
    inflate.inflate_params(image_params, models.tokenizer)
    # The EMA gets copies: the train step donates both, and one buffer cannot be donated twice.
    nnx.update(models.ema, jax.tree.map(jnp.copy, nnx.state(models.tokenizer, nnx.Param)))
    trainer.set_models(models)


def _host_metrics(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@nnx.jit
def _reconstruct(tokenizer, videos_uint8):
    return tokenizer(to_float_video(videos_uint8))[0]


def log_reconstructions(trainer: Trainer, log: runlog.RunLog, step: int, videos: np.ndarray) -> None:
    """Logs originals next to EMA reconstructions of a fixed validation batch."""
    recon = _reconstruct(trainer.models().ema, jnp.asarray(videos))
    side_by_side = np.concatenate([videos, to_uint8_video(recon)], axis=3)
    log.video(step, "reconstruction", side_by_side, fps=trainer.config.data.fps)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the tokenizer described by ``config`` in ``workdir``; returns the last metrics."""
    os.makedirs(workdir, exist_ok=True)
    configlib.save_config(config, os.path.join(workdir, CONFIG_FILE))
    tc = config.train
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.max_to_keep)
    start_step = ckpt.latest_step()
    image_workdir = config.init.image_workdir
    if start_step is None and not image_workdir and config.init.image_stage.num_steps > 0:
        image_workdir = train_image_stage(config, workdir)
    trainer = Trainer(config)
    process_batch = config.data.batch_size // jax.process_count()
    data_it = train_iterator(config, process_batch)
    if start_step is not None:
        state, _ = ckpt.restore(checkpoint.abstract_like(trainer.state), data_iterator=data_it)
        trainer.state = state
    elif image_workdir:
        init_from_image_stage(trainer, image_workdir)
    start_step = start_step or 0
    if start_step >= tc.num_steps:
        ckpt.close()
        return {}

    preview = None
    if tc.video_every:
        source = make_source_for(config.data, "validation", 4)
        preview = np.stack([source[i]["video"] for i in range(min(4, len(source)))])
    rng = jax.random.key(config.seed + 1)
    last, started = {}, time.time()
    desc = "image stage" if config.model.temporal_kernel == 1 else "tokenizer"
    with runlog.RunLog(workdir, total_steps=tc.num_steps, initial_step=start_step, desc=desc) as log:
        step = start_step
        while step < tc.num_steps:
            batch = next(data_it)
            metrics = trainer.train_step(batch["video"], rng)
            step += 1
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise runlog.NonFiniteError(f"step {step}: non-finite loss {loss}; "
                                            f"no checkpoint was written for this step")
            log.advance()
            out_of_time = tc.time_limit_s > 0 and time.time() - started >= tc.time_limit_s
            if step % tc.log_every == 0 or step == tc.num_steps or out_of_time:
                last = _host_metrics(metrics)
                last["learning_rate"] = float(learning_rate_schedule(tc)(step - 1))
                last["elapsed_s"] = time.time() - started
                log.scalars(step, last)
            if preview is not None and (step % tc.video_every == 0 or step == tc.num_steps):
                log_reconstructions(trainer, log, step, preview)
            if step % tc.checkpoint_every == 0 or step == tc.num_steps or out_of_time:
                ckpt.save(step, trainer.state, data_iterator=data_it,
                          metadata={"variant": config.get("variant", ""), "elapsed_s": time.time() - started})
            if out_of_time:
                log.print(f"time limit of {tc.time_limit_s:.0f} s reached at step {step}")
                break
    ckpt.close()
    return last
