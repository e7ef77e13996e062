"""Training and evaluation of the prefix LM: ``train(config, workdir)``, ``evaluate(config, workdir)``.

One readable loop:

    setup      mesh + logical rules, vocabulary layout, model and AdamW state created sharded
    data       a grain iterator over token sequences (its state is checkpointed)
    restore    the latest checkpoint of workdir, after checking its vocabulary layout
    step       jax.jit(train_step) with state/batch shardings and the state donated
    loop       log (loss per modality, tokens/s, MFU), evaluate, checkpoint

Data: until token shards of the tokenizers exist, ``SyntheticSequences`` generates sequences of
VideoPoet's layout that have structure to learn (see its docstring).
"""
from __future__ import annotations

import functools
import itertools
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from videolm import benchmark, checkpoint, configlib, parallel, runlog
from videolm import vocab as vocab_lib
from videolm.model import masks
from videolm.model.loss import lm_loss
from videolm.model.transformer import PrefixLM, count_params

# ----------------------------------------------------------------------------------- vocabulary


def build_layout(vocab_config) -> vocab_lib.VocabLayout:
    """The layout from the tokenizer configs named in ``config.vocab`` (or its explicit numbers)."""
    video = audio = None
    if vocab_config.get("video_tokenizer_config"):
        video = configlib.load_config(vocab_config.video_tokenizer_config)
    if vocab_config.get("audio_tokenizer_config"):
        audio = configlib.load_config(vocab_config.audio_tokenizer_config)
    return vocab_lib.layout_from_configs(
        vocab_config.text_size, video, audio, video_bits=vocab_config.video_bits,
        audio_levels=vocab_config.audio_levels, audio_codes=vocab_config.audio_codes)


def model_kwargs(config, layout: vocab_lib.VocabLayout) -> dict:
    return dict(config.model.to_dict(), vocab_size=layout.padded_size(config.vocab.pad_to_multiple))


# ----------------------------------------------------------------------------------- data


class SyntheticSequences:
    """Deterministic token sequences of VideoPoet's layout with a learnable structure.

    ``<bos> <task_video_audio> <bot_i> text <eot_i> <bov_i> image <eov_i> <res_0> | <bov_o> video
    <eov_o> <boa_o> audio <eoa_o> <eos>``. The text and the image (``image_tokens`` codes drawn
    from the first ``image_codes`` video ids) are random; the video is the image moving: frame 0
    is the image and each next frame is the previous one rolled by -1, 0 or +1 positions, as
    chosen by the first text piece; the audio is level by level, each level one code set by the
    second text piece. A model that learns to copy with the right shift predicts the outputs
    exactly; the unigram baseline does not.

    With ``text_embed_dim > 0`` the text comes as precomputed embeddings instead (the paper's
    T5 route): the text positions hold ``<text_emb>`` placeholders and ``text_embeddings``
    [text_len, text_embed_dim] are the pieces' rows of a fixed random table.
    """

    def __init__(self, layout: vocab_lib.VocabLayout, *, num_examples: int, text_len: int, image_tokens: int,
                 video_frames: int, audio_frames: int, image_codes: int, seed: int = 0, split: str = "train",
                 text_embed_dim: int = 0):
        if layout.text_size < 3 or layout.video_size < image_codes or layout.audio_levels < 1:
            raise ValueError(f"synthetic data needs text_size >= 3, 2**video_bits >= image_codes={image_codes} "
                             f"and audio levels; got {layout}")
        if text_len < 2:
            raise ValueError(f"data.text_len must be >= 2, got {text_len}")
        self.layout, self.num_examples, self.seed = layout, num_examples, seed
        self.text_len, self.image_tokens, self.video_frames = text_len, image_tokens, video_frames
        self.audio_frames, self.image_codes = audio_frames, image_codes
        self.split_id = {"train": 0, "validation": 1, "test": 2}[split]
        self.text_table = (np.random.default_rng([seed, 99]).normal(size=(layout.text_size, text_embed_dim))
                           .astype(np.float32) if text_embed_dim else None)
        self.prefix_len = text_len + image_tokens + 7
        self.length = (self.prefix_len + 1 + video_frames * image_tokens + 1
                       + 1 + layout.audio_levels * audio_frames + 1 + 1)

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        layout, sp = self.layout, self.layout.special
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        text = rng.integers(0, layout.text_size, self.text_len)
        image = rng.integers(0, self.image_codes, self.image_tokens)
        shift = int(text[0] % 3) - 1
        video = np.concatenate([np.roll(image, f * shift) for f in range(self.video_frames)])
        pitch = int(text[1]) % layout.audio_codes
        audio = (pitch + 7 * np.arange(layout.audio_levels)[:, None]) % layout.audio_codes
        audio = np.broadcast_to(audio, (layout.audio_levels, self.audio_frames))
        tokens = np.concatenate([
            [sp("<bos>"), layout.task("video_audio"), sp("<bot_i>")], layout.text_ids(text), [sp("<eot_i>")],
            [sp("<bov_i>")], layout.video_ids(image), [sp("<eov_i>"), sp("<res_0>")],
            [sp("<bov_o>")], layout.video_ids(video), [sp("<eov_o>")],
            [sp("<boa_o>")], layout.audio_ids(audio).reshape(-1), [sp("<eoa_o>"), sp("<eos>")],
        ]).astype(np.int32)
        assert tokens.shape == (self.length,)
        example = {"tokens": tokens, "prefix_len": np.int32(self.prefix_len)}
        if self.text_table is not None:
            tokens[3:3 + self.text_len] = sp("<text_emb>")
            example["text_embeddings"] = self.text_table[text]
        return example


DATASETS = ("synthetic",)


def _synthetic(config, layout, split: str) -> SyntheticSequences:
    data = config.data
    return SyntheticSequences(layout, num_examples=data.num_examples if split == "train" else data.eval_examples,
                              text_len=data.text_len, image_tokens=data.image_tokens,
                              video_frames=data.video_frames, audio_frames=data.audio_frames,
                              image_codes=data.image_codes, seed=config.seed, split=split,
                              text_embed_dim=config.model.text_embed_dim)


def _check_dataset(config):
    if config.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset {config.data.dataset!r} is not available to the LM; known: "
                         f"{', '.join(DATASETS)}")


def train_batches(config, layout):
    """The checkpointable grain iterator of training batches (this process's rows).

    A batch: ``tokens`` int [b, S + 1], ``prefix_len`` int [b], optionally ``segment_ids``
    [b, S + 1] (0 = padding), ``positions`` and ``text_embeddings``; other keys are ignored.
    """
    from videolm.data.pipeline import make_iterator
    _check_dataset(config)
    return make_iterator(_synthetic(config, layout, "train"), batch_size=config.data.batch_size // jax.process_count(),
                         seed=config.seed, shuffle=True)


def eval_batches(config, layout):
    """The validation batches (``eval.num_batches`` of them, the same ones at every evaluation)."""
    from videolm.data.pipeline import make_iterator
    _check_dataset(config)
    batches = make_iterator(_synthetic(config, layout, "validation"), seed=config.seed, shuffle=False, num_epochs=1,
                            batch_size=config.eval.batch_size // jax.process_count())
    return itertools.islice(batches, config.eval.num_batches)


# ----------------------------------------------------------------------------------- model + optimizer


class TrainState(nnx.Module):
    """The model and its optimizer; split once, then updated by a pure jitted step."""

    def __init__(self, model: PrefixLM, tx: optax.GradientTransformation):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


def learning_rate_schedule(train_config):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
        end_value=train_config.learning_rate * train_config.end_learning_rate_fraction)


def make_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm clipping; no decay on norm scales."""
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                    eps=train_config.eps, weight_decay=train_config.weight_decay, mask=decay_mask))


def state_constructor(config, layout):
    kwargs = model_kwargs(config, layout)
    tx = make_optimizer(config.train)
    return lambda: TrainState(PrefixLM(**kwargs, rngs=nnx.Rngs(config.seed)), tx)


# ----------------------------------------------------------------------------------- steps


def compute_loss(model: PrefixLM, batch: dict, layout, *, z_loss: float, chunk_size: int):
    """Next-token loss on the output tokens of ``batch['tokens']`` int [B, S + 1]."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    segment_ids = batch.get("segment_ids")
    seg_in, seg_out = (None, None) if segment_ids is None else (segment_ids[:, :-1], segment_ids[:, 1:])
    positions = batch.get("positions")
    hidden = model.hidden(inputs, prefix_len=batch["prefix_len"], segment_ids=seg_in,
                          positions=None if positions is None else positions[:, :-1],
                          text_embeddings=batch.get("text_embeddings"))
    weights = masks.output_mask(inputs.shape[1], batch["prefix_len"], seg_in, seg_out)
    weights = weights * (targets != layout.pad_id)
    return lm_loss(hidden, model.head[...].astype(hidden.dtype), targets, weights, layout, z_loss=z_loss,
                   chunk_size=chunk_size)


def batch_shardings(batch: dict, mesh, rules) -> dict:
    return {k: parallel.batch_sharding(mesh, rules, np.ndim(v)) for k, v in batch.items()}


def make_train_step(graphdef, state_shardings, batch_example, layout, train_config, mesh, rules):
    """jit(step)(state, batch) -> (state, metrics); the state is donated."""
    schedule = learning_rate_schedule(train_config)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state, batch):
        ts = nnx.merge(graphdef, state)
        loss_fn = functools.partial(compute_loss, layout=layout, z_loss=train_config.z_loss,
                                    chunk_size=train_config.loss_chunk_size)
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(ts.model, batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(ts.optimizer.step[...])
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings(batch_example, mesh, rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(graphdef, state_shardings, batch_example, layout, train_config, mesh, rules):
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state, batch):
        model = nnx.merge(graphdef, state).model
        _, metrics = compute_loss(model, batch, layout, z_loss=train_config.z_loss,
                                  chunk_size=train_config.loss_chunk_size)
        return metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings(batch_example, mesh, rules)),
                   out_shardings=replicated)


def reportable(metrics: dict) -> dict:
    """Floats to log: token counts dropped, and the metrics of modalities absent from the targets."""
    out = {}
    for key, value in metrics.items():
        modality = key.split("_")[0]
        if key.endswith("tokens") or (modality in vocab_lib.MODALITY_NAMES and metrics[f"{modality}_tokens"] == 0):
            continue
        out[key] = float(value)
    return out


def run_eval(eval_step, state, config, layout, mesh, rules) -> dict:
    """Metrics over ``eval.num_batches`` validation batches, each weighted by its token count."""
    sums, counts = {}, {}
    for batch in eval_batches(config, layout):
        metrics = jax.device_get(eval_step(state, parallel.shard_batch(batch, mesh, rules)))
        for key, value in reportable(metrics).items():
            modality = key.split("_")[0]
            n = float(metrics[f"{modality}_tokens" if modality in vocab_lib.MODALITY_NAMES else "tokens"])
            sums[key] = sums.get(key, 0.0) + value * n
            counts[key] = counts.get(key, 0.0) + n
    return {k: sums[k] / counts[k] for k in sums}


# ----------------------------------------------------------------------------------- checkpoints


def _check_layout(meta: dict, layout: vocab_lib.VocabLayout, where: str) -> None:
    if "vocab" not in meta:
        raise vocab_lib.VocabMismatchError(f"checkpoint in {where} has no vocabulary layout; refusing to load it")
    layout.check_matches(meta["vocab"], what=f"checkpoint in {where}")


def restore_state(ckpt: checkpoint.Checkpointer, abstract_state, layout, data_iterator=None):
    """(state, step) of the latest checkpoint, after checking its vocabulary layout."""
    meta = ckpt.restore_metadata()
    _check_layout(meta, layout, ckpt.directory)
    pure, meta = ckpt.restore(nnx.to_pure_dict(abstract_state), data_iterator=data_iterator)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, pure)
    return state, int(meta["step"])


# ----------------------------------------------------------------------------------- train / evaluate


def model_flops_per_token(params_nonembedding: int, depth: int, attention_width: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 x non-embedding params + 12 x layers x width x seq (attention)."""
    return 6 * params_nonembedding + 12 * depth * attention_width * seq_len


def setup(config, devices=None):
    """Mesh (over ``devices``, default all), rules, layout, graphdef, abstract state with shardings."""
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    layout = build_layout(config.vocab)
    graphdef, abstract = parallel.abstract_state(state_constructor(config, layout), mesh, rules)
    return mesh, rules, layout, graphdef, abstract


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> dict:
    """Trains (or resumes) the LM described by ``config`` in ``workdir``; returns the last metrics.

    ``stop_at_step`` ends the run early (after checkpointing that step) as an interruption
    would: the schedule still follows ``train.num_steps``.
    """
    mesh, rules, layout, graphdef, abstract = setup(config)
    tc = config.train
    dp = parallel.data_parallel_size(mesh, rules)
    for name, size in (("data.batch_size", config.data.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if size % dp:
            raise ValueError(f"{name}={size} must be divisible by the {dp} data-parallel shards")
    os.makedirs(workdir, exist_ok=True)
    configlib.save_config(config, os.path.join(workdir, "config.json"))
    layout.save(os.path.join(workdir, "vocab.json"))

    data_iter = train_batches(config, layout)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    with parallel.use_mesh(mesh, rules):
        if ckpt.latest_step() is not None:
            state, step = restore_state(ckpt, abstract, layout, data_iterator=data_iter)
        else:
            state = nnx.state(parallel.create_sharded(state_constructor(config, layout), mesh, rules))
            step = 0
        counts = count_params(nnx.state(nnx.merge(graphdef, state).model, nnx.Param))
        first = next(data_iter)
        train_step = make_train_step(graphdef, state_shardings, first, layout, tc, mesh, rules)
        eval_step = make_eval_step(graphdef, state_shardings, first, layout, tc, mesh, rules)

    seq_len = first["tokens"].shape[1] - 1
    model_cfg = config.model
    attn_width = model_cfg.num_heads * (model_cfg.get("head_dim") or model_cfg.width // model_cfg.num_heads)
    flops_per_token = model_flops_per_token(counts["params_nonembedding"], model_cfg.depth, attn_width, seq_len)
    # MFU against the same-run f32 matmul peak (fake CPU devices share the host's cores).
    peak = benchmark.matmul_peak_gflops(size=1024, repeats=3)
    peak *= jax.device_count() if jax.default_backend() != "cpu" else 1
    log = runlog.RunLog(workdir, total_steps=tc.num_steps, initial_step=step, desc="lm")
    log.print(f"lm: {counts['params']:,} params ({counts['params_nonembedding']:,} non-embedding), vocab "
              f"{layout.size} -> {model_kwargs(config, layout)['vocab_size']}, seq {seq_len}, mesh {dict(mesh.shape)}, "
              f"start step {step}")
    metrics, batch = {}, first
    last = tc.num_steps if stop_at_step is None else min(stop_at_step, tc.num_steps)
    timer_start, timer_step = time.perf_counter(), step
    with parallel.use_mesh(mesh, rules):
        while step < last:
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh, rules))
            step += 1
            log.advance()
            if step % tc.log_every == 0 or step == last:
                metrics = reportable(jax.device_get(metrics))  # waits for the step: times are exact
                seconds = (time.perf_counter() - timer_start) / (step - timer_step)
                tokens_per_s = batch["tokens"].shape[0] * jax.process_count() * seq_len / seconds
                metrics.update(step_seconds=seconds, tokens_per_s=tokens_per_s,
                               mfu=tokens_per_s * flops_per_token / 1e9 / peak)
                log.scalars(step, metrics)
                timer_start, timer_step = time.perf_counter(), step
            if step % tc.eval_every == 0 or step == last:
                log.scalars(step, run_eval(eval_step, state, config, layout, mesh, rules), prefix="eval")
                timer_start = time.perf_counter()
            if step % tc.checkpoint_every == 0 or step == last:
                ckpt.save(step, nnx.to_pure_dict(state), data_iterator=data_iter,
                          metadata={"vocab": layout.to_dict(), "config": configlib.config_to_dict(config)})
                timer_start = time.perf_counter()
            if step < last:
                batch = next(data_iter)
    ckpt.close()
    log.close()
    return metrics


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Validation loss/accuracy (overall and per modality) of the latest checkpoint in ``workdir``."""
    mesh, rules, layout, graphdef, abstract = setup(config)
    ckpt = checkpoint.Checkpointer(workdir)
    if ckpt.latest_step() is None:
        raise checkpoint.CheckpointError(f"no checkpoint to evaluate in {workdir}")
    with parallel.use_mesh(mesh, rules):
        state, step = restore_state(ckpt, abstract, layout)
        example = next(iter(eval_batches(config, layout)))
        state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
        eval_step = make_eval_step(graphdef, state_shardings, example, layout, config.train, mesh, rules)
        result = run_eval(eval_step, state, config, layout, mesh, rules)
    ckpt.close()
    return {"step": step, **result}
