"""``videolm bench lm --config configs/lm.py:bench``: training-step throughput and MFU.

What is timed: the real training step of ``videolm/train.py`` (forward, fused logits + loss on the
output tokens, backward, clipping, AdamW update; state donated) on random tokens of shape
[batch, seq_len + 1] with ``prefix_len`` prefix positions, after ``warmup`` untimed steps; the
median of ``steps`` timed steps is reported.

FLOPs, counted the standard way (PaLM, appendix B) so that the ratio to any other implementation
is fair:

    model_flops_per_token = 6 * N + 12 * layers * attention_width * seq_len

* N = non-embedding parameters: every parameter except the input embedding table (the output
  projection and the norm scales are included). 6 = 2 FLOPs per multiply-add x 3 (the forward
  matmul, and two of the same size in the backward pass: input and weight gradients).
* Attention scores QK^T and the weighted sum AV each cost 2 * seq_len * attention_width FLOPs
  per token and layer in the forward pass, x 3 for forward + backward = 12 * seq_len * width. The
  whole seq x seq matrix is counted (no discount for the prefix-LM mask).
* tokens per step = batch * seq_len, prefix positions included; logits are computed at every
  position (the loss is masked to the outputs).

``mfu`` = achieved GFLOP/s / ``peak_gflops``, the f32 matmul peak of this process measured in the
same run before and after the timed steps (the larger of the two, so the ratio is conservative).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from videolm import benchmark, parallel
from videolm.model.transformer import count_params
from videolm.train import make_train_step, model_flops_per_token, setup, state_constructor


def bench(config) -> dict:
    if config is None:
        raise ValueError("videolm bench lm needs --config configs/lm.py:bench (or another LM config)")
    bc, mc = config.bench, config.model
    if not 0 <= bc.prefix_len < bc.seq_len:
        raise ValueError(f"bench.prefix_len={bc.prefix_len} must be in [0, bench.seq_len={bc.seq_len})")
    mesh, rules, layout, graphdef, abstract = setup(config)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    with parallel.use_mesh(mesh, rules):
        state = nnx.state(parallel.create_sharded(state_constructor(config, layout), mesh, rules))
    model = nnx.merge(graphdef, state).model
    counts, vocab_size = count_params(nnx.state(model, nnx.Param)), model.vocab_size
    del model  # its arrays are donated to the first step

    rng = np.random.default_rng(1)
    batch = {"tokens": rng.integers(0, vocab_size, (bc.batch_size, bc.seq_len + 1)).astype(np.int32),
             "prefix_len": np.full((bc.batch_size,), bc.prefix_len, np.int32)}
    with parallel.use_mesh(mesh, rules):
        step = make_train_step(graphdef, state_shardings, batch, layout, config.train, mesh, rules)
        device_batch = parallel.shard_batch(batch, mesh, rules)
        holder = {"state": state}
        losses = []

        def run():
            holder["state"], metrics = step(holder["state"], device_batch)
            losses.append(metrics["loss"])
            return metrics["loss"]

        with benchmark.PeakBracket() as peak:
            timing = benchmark.time_fn(run, steps=bc.steps, warmup=bc.warmup)

    attention_width = mc.num_heads * (mc.get("head_dim") or mc.width // mc.num_heads)
    flops_per_token = model_flops_per_token(counts["params_nonembedding"], mc.depth, attention_width, bc.seq_len)
    tokens_per_step = bc.batch_size * bc.seq_len
    step_seconds = timing["median_s"]
    tokens_per_s = tokens_per_step / step_seconds
    achieved = flops_per_token * tokens_per_s / 1e9
    peak_gflops = peak.gflops * (jax.device_count() if jax.default_backend() != "cpu" else 1)
    return {
        "benchmark": "lm_train_step",
        "tokens_per_s": tokens_per_s,
        "step_seconds": step_seconds,
        "step_seconds_all": timing["times_s"],
        "model_flops_per_token": flops_per_token,
        "achieved_gflops": achieved,
        "peak_gflops": peak_gflops,
        "peak_gflops_start": peak.start,
        "peak_gflops_end": peak.end,
        "mfu": achieved / peak_gflops,
        "params": counts["params"],
        "params_nonembedding": counts["params_nonembedding"],
        "vocab_size": vocab_size, "width": mc.width, "depth": mc.depth, "heads": mc.num_heads,
        "kv_heads": mc.num_kv_heads, "mlp_dim": mc.mlp_dim, "batch": bc.batch_size, "seq_len": bc.seq_len,
        "prefix_len": bc.prefix_len, "dtype": mc.dtype, "remat_policy": mc.remat_policy,
        "scan_layers": mc.scan_layers, "attention_impl": mc.attention_impl,
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "flops_formula": "6*params_nonembedding + 12*layers*heads*head_dim*seq (full seq x seq attention, "
                         "tokens = batch*seq incl. prefix)",
        **benchmark.environment(),
    }
