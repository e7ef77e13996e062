"""Training and evaluation of the prefix LM: ``train(config, workdir)``, ``evaluate(config, workdir)``.

One readable loop:

    setup      mesh + logical rules, vocabulary layout, model and AdamW state created sharded
    data       a grain iterator over token sequences (its state is checkpointed)
    restore    the latest checkpoint of workdir, after checking its vocabulary layout
    step       jax.jit(train_step) with state/batch shardings and the state donated
    loop       log (loss per modality, tokens/s, MFU), evaluate, checkpoint

Data (videolm/lm_data.py): the task mixture over the token shards of ``videolm tokenize``, one task
per step, validated per task against its unigram baseline; or synthetic sequences of the same
layout for tests and benchmarks.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from videolm import benchmark, checkpoint, configlib, lm_data, mixture, parallel, runlog
from videolm import vocab as vocab_lib
from videolm.model import masks
from videolm.model.loss import lm_loss
from videolm.model.transformer import PrefixLM, count_params

def model_kwargs(config, layout: vocab_lib.VocabLayout) -> dict:
    return dict(config.model.to_dict(), vocab_size=layout.padded_size(config.vocab.pad_to_multiple))


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


def _weighted_mean(batch_metrics: list[dict]) -> dict:
    """Metrics over batches, each weighted by its (per-modality) token count."""
    sums, counts = {}, {}
    for metrics in batch_metrics:
        for key, value in reportable(metrics).items():
            modality = key.split("_")[0]
            n = float(metrics[f"{modality}_tokens" if modality in vocab_lib.MODALITY_NAMES else "tokens"])
            sums[key] = sums.get(key, 0.0) + value * n
            counts[key] = counts.get(key, 0.0) + n
    return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}


def run_eval(eval_step, state, eval_sets: dict[str, list[dict]], mesh, rules) -> dict:
    """Validation metrics: of the one set ``'all'`` as they are, of task sets as ``task/metric``
    (and ``loss``/``accuracy`` over all tasks' target tokens)."""
    per_set = {name: [jax.device_get(eval_step(state, parallel.shard_batch(b, mesh, rules))) for b in batches]
               for name, batches in eval_sets.items()}
    if set(per_set) == {"all"}:
        return _weighted_mean(per_set["all"])
    out = {}
    for name, metrics in per_set.items():
        out.update({f"{name}/{k}": v for k, v in _weighted_mean(metrics).items()})
    overall = _weighted_mean([m for metrics in per_set.values() for m in metrics])
    out.update(loss=overall["loss"], accuracy=overall["accuracy"])
    return out


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
    layout = lm_data.build_layout(config)
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

    data_iter = lm_data.train_batches(config, layout)
    sets = lm_data.eval_sets(config, layout)
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
        eval_example = next(iter(sets.values()))[0]
        eval_step = make_eval_step(graphdef, state_shardings, eval_example, layout, tc, mesh, rules)

    model_cfg = config.model
    attn_width = model_cfg.num_heads * (model_cfg.get("head_dim") or model_cfg.width // model_cfg.num_heads)
    flops_per_token = functools.partial(model_flops_per_token, counts["params_nonembedding"], model_cfg.depth,
                                        attn_width)
    # MFU against the same-run f32 matmul peak (fake CPU devices share the host's cores).
    peak = benchmark.matmul_peak_gflops(size=1024, repeats=3)
    peak *= jax.device_count() if jax.default_backend() != "cpu" else 1
    log = runlog.RunLog(workdir, total_steps=tc.num_steps, initial_step=step, desc="lm")
    log.print(f"lm: {counts['params']:,} params ({counts['params_nonembedding']:,} non-embedding), vocab "
              f"{layout.size} -> {model_kwargs(config, layout)['vocab_size']}, data {config.data.dataset}, "
              f"mesh {dict(mesh.shape)}, start step {step}")
    baselines = lm_data.unigram_baselines(config, layout)
    if baselines:
        log.scalars(step, {f"{task}/unigram_loss": value for task, value in baselines.items()}, prefix="baseline")
    metrics, batch = {}, first
    last = tc.num_steps if stop_at_step is None else min(stop_at_step, tc.num_steps)
    shapes = set()  # distinct batch shapes = compiled training programs
    run_start = time.perf_counter()
    window = dict(start=time.perf_counter(), steps=0, positions=0, padding=0, flops=0.0)
    with parallel.use_mesh(mesh, rules):
        while step < last:
            shapes.add(batch["tokens"].shape)
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh, rules))
            step += 1
            if tc.get("time_limit_s", 0) > 0 and time.perf_counter() - run_start > tc.time_limit_s and step < last:
                log.print(f"lm: time limit of {tc.time_limit_s:.0f} s reached at step {step}; checkpointing")
                last = step  # the steps below log, evaluate and checkpoint this one as the last
            # Positions the model processed (S per row), padding among them, model FLOPs.
            rows, seq_len = batch["tokens"].shape[0] * jax.process_count(), batch["tokens"].shape[1] - 1
            window["steps"] += 1
            window["positions"] += rows * seq_len
            window["padding"] += rows * seq_len * (mixture.padding_fraction(batch) if "segment_ids" in batch else 0.0)
            window["flops"] += rows * seq_len * flops_per_token(seq_len)
            log.advance()
            if step % tc.log_every == 0 or step == last:
                metrics = reportable(jax.device_get(metrics))  # waits for the step: times are exact
                seconds = time.perf_counter() - window["start"]
                metrics.update(step_seconds=seconds / window["steps"], tokens_per_s=window["positions"] / seconds,
                               mfu=window["flops"] / seconds / 1e9 / peak,
                               padding_fraction=window["padding"] / window["positions"],
                               compiled_shapes=len(shapes))
                if "task_id" in batch:
                    metrics[f"{lm_data.task_of(config, batch)}/loss"] = metrics["loss"]
                log.scalars(step, metrics)
                window = dict(start=time.perf_counter(), steps=0, positions=0, padding=0, flops=0.0)
            paused = time.perf_counter()  # evaluation and checkpoints are left out of the throughput
            if step % tc.eval_every == 0 or step == last:
                log.scalars(step, run_eval(eval_step, state, sets, mesh, rules), prefix="eval")
            if step % tc.checkpoint_every == 0 or step == last:
                ckpt.save(step, nnx.to_pure_dict(state), data_iterator=data_iter,
                          metadata={"vocab": layout.to_dict(), "config": configlib.config_to_dict(config)})
            window["start"] += time.perf_counter() - paused
            if step < last:
                batch = next(data_iter)
    ckpt.close()
    log.close()
    return metrics


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Validation loss/accuracy (overall, per modality and per task) of the latest checkpoint in ``workdir``,
    with each task's unigram baseline."""
    mesh, rules, layout, graphdef, abstract = setup(config)
    ckpt = checkpoint.Checkpointer(workdir)
    if ckpt.latest_step() is None:
        raise checkpoint.CheckpointError(f"no checkpoint to evaluate in {workdir}")
    with parallel.use_mesh(mesh, rules):
        state, step = restore_state(ckpt, abstract, layout)
        sets = lm_data.eval_sets(config, layout)
        state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
        eval_step = make_eval_step(graphdef, state_shardings, next(iter(sets.values()))[0], layout, config.train,
                                   mesh, rules)
        result = run_eval(eval_step, state, sets, mesh, rules)
    ckpt.close()
    result.update({f"{task}/unigram_loss": v for task, v in lm_data.unigram_baselines(config, layout).items()})
    return {"step": step, **dict(sorted(result.items()))}
