"""``videolm bench decode --config configs/lm.py:bench``: KV-cache decoding against recomputation.

What is timed, for the config's model (random weights, f32 on CPU), batch ``batch_size``, a random
prefix of ``prefix_len`` ids and ``num_tokens`` generated ids (greedy, unconstrained):

* ``tokens_per_s``: ``videolm.sampling.generate`` with the KV cache, one compiled program (prefill
  + a ``lax.scan`` of one-token steps); the median of ``repeats`` timed runs after a compiling
  one. As in the PyTorch peer, it counts the ``num_tokens - 1`` tokens made by cached steps over
  the time after the prefill (the prefill, a separate compiled program of the same shapes, is
  timed alone and subtracted); ``tokens_per_s_incl_prefill`` counts every token over the whole run.
* ``tokens_per_s_no_cache``: recomputing the whole sequence at every step, i.e. at step n one full
  forward of the ``prefix_len + n`` ids so far (logits at the last position only). A forward of
  each length would be a compile of its own, so the forward is timed at ``no_cache_lengths``
  lengths spread over ``[prefix_len, prefix_len + num_tokens - 1]`` and the sum over all
  ``num_tokens`` steps is integrated from them (trapezoid rule); the output says so.
* ``speedup``: that no-cache total over the cached run's total time (prefill included).
* ``outputs_match``: the cached tokens equal the reference decoder's (the whole sequence
  recomputed each step, ``generate(use_cache=False)``) over the first ``check_tokens`` tokens.

Decode FLOPs per token (for ``decode_fraction_of_peak``): 2 x non-embedding parameters + 4 x
layers x attention width x context, at the mean context ``prefix_len + (num_tokens - 1) / 2``.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from videolm import benchmark, parallel, sampling
from videolm.model import decode
from videolm.model.transformer import PrefixLM, count_params
from videolm.lm_data import vocab_layout
from videolm.train import model_kwargs

DEFAULTS = dict(batch_size=1, prefix_len=256, num_tokens=1280, repeats=3, no_cache_lengths=6, check_tokens=8)


def settings(config) -> ml_collections.ConfigDict:
    """``config.decode_bench`` over the defaults (prefix 256, 1,280 tokens, batch 1)."""
    out = ml_collections.ConfigDict(DEFAULTS)
    if config.get("decode_bench") is not None:
        unknown = set(config.decode_bench.keys()) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"decode_bench: unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        out.update(config.decode_bench.to_dict())
    for name in ("batch_size", "prefix_len", "num_tokens", "repeats", "no_cache_lengths"):
        if int(out[name]) < 1:
            raise ValueError(f"decode_bench.{name} must be >= 1, got {out[name]}")
    if out.no_cache_lengths < 2 and out.num_tokens > 1:
        raise ValueError("decode_bench.no_cache_lengths must be >= 2 to integrate over the lengths")
    return out


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    timing = benchmark.time_fn(fn, steps=repeats, warmup=1)
    return timing["median_s"], timing["times_s"]


def _no_cache_seconds(graphdef, state, batch: int, prefix_len: int, num_tokens: int, vocab: int, points: int,
                      repeats: int):
    """Estimated seconds of ``num_tokens`` steps that each run the whole sequence so far."""
    def last_logits(state, tokens, prefix):
        model = nnx.merge(graphdef, state)
        return model.logits(model.hidden(tokens, prefix_len=prefix)[:, -1:])[:, 0]

    forward = jax.jit(last_logits)
    lengths = sorted({int(round(x)) for x in np.linspace(prefix_len, prefix_len + num_tokens - 1, points)})
    rng = np.random.default_rng(7)
    samples = []
    for length in lengths:
        tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
        prefix = jnp.full((batch,), prefix_len, jnp.int32)
        seconds, _ = _median_seconds(lambda: forward(state, tokens, prefix), repeats)
        samples.append((length, seconds))
    total = samples[0][1]  # the first step; then each step to the next sample point, trapezoid rule
    for (l0, t0), (l1, t1) in zip(samples, samples[1:]):
        total += (l1 - l0) * (t0 + t1) / 2
    return total, samples


def bench(config) -> dict:
    if config is None:
        raise ValueError("videolm bench decode needs --config configs/lm.py:bench (or another LM config)")
    bc = settings(config)
    layout = vocab_layout(config.vocab)
    kwargs = model_kwargs(config, layout)
    with jax.default_device(jax.devices()[0]):
        model = parallel.init_jitted(lambda: PrefixLM(**kwargs, rngs=nnx.Rngs(config.seed)))
    counts = count_params(nnx.state(model, nnx.Param))
    graphdef, state = nnx.split(model)
    b, p, n = int(bc.batch_size), int(bc.prefix_len), int(bc.num_tokens)
    rng = np.random.default_rng(3)
    prefixes = rng.integers(0, layout.size, (b, p)).astype(np.int32)
    greedy = sampling.SamplingConfig(temperature=0.0)

    # Prefill alone (same shapes as inside generate), to split the cached run's time.
    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = decode.init_cache(m, b, p + n - 1)
        return decode.prefill(m, tokens, jnp.zeros((b,), jnp.int32), cache)[0]

    tokens_in = jnp.asarray(prefixes)
    outputs = []

    def cached_run():
        out = sampling.generate(model, prefixes, num_tokens=n, allowed=None, sampling=greedy, vocab=layout)
        outputs.append(out)
        return out

    with benchmark.PeakBracket() as peak:
        start = time.perf_counter()
        cached_run()
        first_call = time.perf_counter() - start
        cached_s, cached_all = _median_seconds(cached_run, bc.repeats)
        prefill_s, _ = _median_seconds(lambda: prefill(state, tokens_in), bc.repeats)
        no_cache_s, samples = _no_cache_seconds(graphdef, state, b, p, n, model.vocab_size,
                                                int(bc.no_cache_lengths), max(1, min(bc.repeats, 2)))

    check = min(int(bc.check_tokens), n)
    reference = sampling.generate(model, prefixes, num_tokens=check, sampling=greedy, vocab=layout,
                                  use_cache=False)
    outputs_match = bool((reference == outputs[-1][:, :check]).all())
    runs_agree = all((o == outputs[0]).all() for o in outputs)

    decode_s = max(cached_s - prefill_s, 1e-9)
    tokens_per_s = b * (n - 1) / decode_s
    width, depth = config.model.width, config.model.depth
    attention_width = config.model.num_heads * (config.model.get("head_dim") or width // config.model.num_heads)
    flops_per_token = 2 * counts["params_nonembedding"] + 4 * depth * attention_width * (p + (n - 1) / 2)
    return {
        "benchmark": "lm_decode",
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_incl_prefill": b * n / cached_s,
        "tokens_per_s_no_cache": b * n / no_cache_s,
        "speedup": no_cache_s / cached_s,
        "ms_per_step": 1e3 * decode_s / max(1, n - 1),
        "cached_seconds": cached_s,
        "cached_seconds_all": cached_all,
        "prefill_seconds": prefill_s,
        "first_call_seconds_incl_compile": first_call,
        "no_cache_seconds_estimated": no_cache_s,
        "no_cache_forward_samples": [{"len": length, "seconds": s} for length, s in samples],
        "no_cache_method": f"full forward timed at {len(samples)} lengths in [{p}, {p + n - 1}], summed over the "
                           f"{n} steps by the trapezoid rule (not run token by token)",
        "speedup_definition": "no-cache seconds for all tokens / cached seconds for all tokens (prefill included)",
        "outputs_match": outputs_match,
        "compared_tokens": check,
        "runs_agree": runs_agree,
        "decode_flops_per_token": flops_per_token,
        "decode_achieved_gflops": flops_per_token * tokens_per_s / 1e9,
        "peak_gflops": peak.gflops,
        "peak_gflops_start": peak.start,
        "peak_gflops_end": peak.end,
        "decode_fraction_of_peak": flops_per_token * tokens_per_s / 1e9 / peak.gflops,
        "batch": b, "prefix_len": p, "num_tokens": n,
        "params": counts["params"], "params_nonembedding": counts["params_nonembedding"],
        "vocab_size": model.vocab_size, "width": width, "depth": depth, "heads": config.model.num_heads,
        "kv_heads": config.model.num_kv_heads, "mlp_dim": config.model.mlp_dim, "dtype": config.model.dtype,
        "scan_layers": config.model.scan_layers,
        **benchmark.environment(),
    }
