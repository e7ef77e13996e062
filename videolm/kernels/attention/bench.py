"""``videolm bench attention``: correctness, skipped blocks and speed of the flash kernel.

One row (JSON line) per configuration:

* ``part="correctness"``: max |kernel - dense reference| of out, dq, dk, dv for the prefix
  cases, segment ids and bf16, per backend. On CPU the kernels run in their interpreters
  on small shapes; on an accelerator the compiled kernel runs at ``seq_len=1024``.
* ``part="speed"``: for every sequence length (1k..8k) and mask (plain causal; a 256-token
  text/image prefix; a 256 + 1,280 = 1,536-token prefix as when a video conditions the
  output), the fractions of skipped / full / partial tiles, and on a GPU or TPU the median
  forward and forward+backward times of the kernel, of ``jax.nn.dot_product_attention``
  (xla, and cudnn on GPU) with the same mask, and the kernel's prefix/causal time ratio.

Options come from an optional config (``--config``) with any of the keys of DEFAULTS.
``python -m videolm.kernels.attention.bench --tune SEQ`` sweeps block sizes on the
accelerator and prints the best, to update ``block_sizes.TABLE``.
"""
from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp

from videolm import benchmark
from videolm.kernels.attention import block_sizes as bs
from videolm.kernels.attention.block_mask import mask_block_stats
from videolm.kernels.attention.flash import default_backend, flash_attention
from videolm.kernels.attention.reference import reference_attention, xla_attention

DEFAULTS = dict(
    seq_lens=(1024, 2048, 4096, 8192),
    text_image_prefix=256,      # <bos> <task> text / one image: 256 tokens
    video_tokens=1280,          # 17 frames at 128x128 -> 5 x 16 x 16 latent tokens
    batch=2, num_heads=16, num_kv_heads=16, head_dim=128,  # the 1B model's attention
    dtype="bfloat16", steps=5, warmup=2,
)


def _options(config) -> dict:
    opts = dict(DEFAULTS)
    if config is not None:
        for key in opts:
            if key in config:
                opts[key] = config[key]
        unknown = set(config.keys()) - set(opts) - {"kind"}
        if unknown:
            raise ValueError(f"attention bench: unknown options {sorted(unknown)}; "
                             f"expected some of {sorted(DEFAULTS)}")
    opts["seq_lens"] = tuple(int(s) for s in opts["seq_lens"])
    return opts


def _masks(opts, seq_len):
    prefix = opts["text_image_prefix"]
    return (("causal", None), (f"prefix_{prefix}", prefix),
            (f"prefix_{prefix + opts['video_tokens']}", prefix + opts["video_tokens"]))


def _inputs(b, s, h, kvh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = ((b, s, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, s, h, d))
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
                 for key, shape in zip(ks, shapes))


def _fwd_and_grads(attn):
    def run(q, k, v, do, prefix_len, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, prefix_len=prefix_len,
                                                segment_ids=segment_ids), q, k, v)
        return (out,) + vjp(do)
    return jax.jit(run)


# --------------------------------------------------------------------------- correctness

def correctness_rows(on_accelerator: bool) -> list[dict]:
    """Max errors against the dense f32 reference, per backend and case."""
    rows = []
    if on_accelerator:
        plans = [(default_backend(), None, 1024, (0, 1, 200, 512, 1024))]
    else:  # interpreters: small shapes, small blocks
        plans = [("tpu", bs.uniform(128), 300, (0, 1, 64, 128, 300)),
                 ("gpu", bs.uniform(32), 100, (0, 1, 48, 64, 100))]
    for backend, sizes, s, prefixes in plans:
        kern = functools.partial(flash_attention, backend=backend, block_sizes=sizes)
        cases = [("prefix_lm", jnp.float32, prefixes, None)]
        cuts = jnp.searchsorted(jnp.asarray([s // 3 + 5, 2 * s // 3]), jnp.arange(s), "right")
        cases.append(("segments", jnp.float32, prefixes[:2],
                      jnp.broadcast_to(cuts, (2, s)).astype(jnp.int32)))
        cases.append(("bf16_prefix_lm", jnp.bfloat16, prefixes[2:4], None))
        heads, kv_heads = (4, 2) if on_accelerator else (2, 1)
        for name, dtype, prefix, seg in cases:
            b = len(prefix)
            q, k, v, do = _inputs(b, s, heads, kv_heads, 64, dtype)
            prefix = jnp.asarray(prefix, jnp.int32)
            got = _fwd_and_grads(kern)(q, k, v, do, prefix, seg)
            up = [x.astype(jnp.float32) for x in (q, k, v, do)]
            want = _fwd_and_grads(reference_attention)(*up, prefix, seg)
            row = {"bench": "attention", "part": "correctness", "backend": backend,
                   "interpret": not on_accelerator, "case": name,
                   "dtype": jnp.dtype(dtype).name, "seq_len": s, "heads": heads,
                   "kv_heads": kv_heads,
                   "prefix_lens": [int(p) for p in prefix]}
            for which, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                row[f"max_err_{which}"] = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------- speed

def _timer(attn, opts):
    """measure(q, k, v, do, prefix_len) -> median ms of the forward and of
    forward+backward (or the error raised); compiled once per shape."""
    def fwd(q, k, v, prefix_len):
        return attn(q, k, v, prefix_len=prefix_len)

    def fwd_bwd(q, k, v, do, prefix_len):
        _, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, prefix_len), q, k, v)
        return vjp(do)
    fwd, fwd_bwd = jax.jit(fwd), jax.jit(fwd_bwd)

    def median_ms(fn, *args):
        timing = benchmark.time_fn(lambda: fn(*args), steps=opts["steps"],
                                   warmup=opts["warmup"])
        return 1e3 * timing["median_s"]

    def measure(q, k, v, do, prefix_len) -> dict:
        try:
            return {"fwd_ms": median_ms(fwd, q, k, v, prefix_len),
                    "fwd_bwd_ms": median_ms(fwd_bwd, q, k, v, do, prefix_len)}
        except Exception as e:  # noqa: BLE001 (a reference may not support this case)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return measure


def _cudnn_is_causal(q, k, v, *, prefix_len):
    del prefix_len  # only timed for plain causal rows
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def speed_rows(opts, on_accelerator: bool) -> list[dict]:
    """Tile fractions for the block sizes of each backend's table (on CPU: both) and, on
    an accelerator, the times."""
    rows = []
    dtype = jnp.dtype(opts["dtype"])
    b, h, kvh, d = opts["batch"], opts["num_heads"], opts["num_kv_heads"], opts["head_dim"]
    backends = (default_backend(),) if on_accelerator else ("tpu", "gpu")
    for backend, s in itertools.product(backends, opts["seq_lens"]):
        sizes = bs.get_block_sizes(backend, s, d, dtype)
        causal_kernel_ms = None
        if on_accelerator:
            inputs = _inputs(b, s, h, kvh, d, dtype)
            impls = {"kernel": functools.partial(flash_attention, block_sizes=sizes,
                                                 backend=backend),
                     "xla": functools.partial(xla_attention, implementation="xla")}
            if backend == "gpu" and jax.default_backend() != "cpu":
                impls["cudnn"] = functools.partial(xla_attention, implementation="cudnn")
            timers = {name: _timer(attn, opts) for name, attn in impls.items()}
            if "cudnn" in impls:  # cuDNN's own causal mode (no mask array): causal rows only
                causal_only = {"cudnn_is_causal": _timer(_cudnn_is_causal, opts)}
        for mask, prefix_len in _masks(opts, s):
            p = None if prefix_len is None else min(prefix_len, s)
            stats = mask_block_stats(s, p, block_q=sizes.block_q, block_k=sizes.block_k)
            row = {"bench": "attention", "part": "speed", "backend": backend,
                   "device": jax.devices()[0].device_kind if on_accelerator else "analytic",
                   "seq_len": s, "mask": mask,
                   "prefix_len": p or 0, "batch": b, "heads": h, "kv_heads": kvh,
                   "head_dim": d, "dtype": dtype.name,
                   "block_q": sizes.block_q, "block_k": sizes.block_k,
                   "skipped_frac": stats["skipped"], "full_frac": stats["full"],
                   "partial_frac": stats["partial"],
                   "computed_vs_causal": stats["computed"] / stats["causal_computed"]}
            if on_accelerator:
                # Prefix 0 is plain causal: every mask runs the same compiled programs.
                prefix = jnp.full((b,), p or 0, jnp.int32)
                extra = causal_only if mask == "causal" and "cudnn" in impls else {}
                for name, measure in {**timers, **extra}.items():
                    for key, val in measure(*inputs, prefix).items():
                        row[f"{name}_{key}"] = val
                if mask == "causal":
                    causal_kernel_ms = row.get("kernel_fwd_bwd_ms")
                elif causal_kernel_ms and "kernel_fwd_bwd_ms" in row:
                    row["kernel_fwd_bwd_vs_causal"] = row["kernel_fwd_bwd_ms"] / causal_kernel_ms
                if "cudnn_fwd_bwd_ms" in row and "kernel_fwd_bwd_ms" in row:
                    row["kernel_fwd_bwd_vs_cudnn"] = row["kernel_fwd_bwd_ms"] / row["cudnn_fwd_bwd_ms"]
            rows.append(row)
    return rows


def run_bench(config=None) -> list[dict]:
    """All rows: correctness first, then one speed row per (sequence length, mask)."""
    opts = _options(config)
    on_accelerator = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    return correctness_rows(on_accelerator) + speed_rows(opts, on_accelerator)


# ---------------------------------------------------------------------------------- tune

def tune(seq_len: int, opts=None, prefix_len: int | None = None) -> list[dict]:
    """Times forward+backward for candidate block sizes on the default accelerator."""
    opts = _options(opts)
    backend = default_backend()
    if jax.default_backend() == "cpu":
        raise RuntimeError("tuning needs a GPU or TPU: interpreted kernels say nothing about speed")
    dtype = jnp.dtype(opts["dtype"])
    q, k, v, do = _inputs(opts["batch"], seq_len, opts["num_heads"], opts["num_kv_heads"],
                          opts["head_dim"], dtype)
    prefix = jnp.full((opts["batch"],), prefix_len or 0, jnp.int32)
    choices = (128, 256, 512, 1024) if backend == "tpu" else (32, 64, 128)
    rows = []
    for fq, fk, bq, bk in itertools.product(choices, repeat=4):
        if max(fq, fk, bq, bk) > seq_len:
            continue
        sizes = bs.BlockSizes(fq, fk, bq, bk, bq, bk)
        row = {"bench": "attention_tune", "seq_len": seq_len, "block_sizes": sizes.all()}
        row.update(_timer(functools.partial(flash_attention, block_sizes=sizes), opts)(
            q, k, v, do, prefix))
        rows.append(row)
        benchmark.emit(row)
    ok = [r for r in rows if "fwd_bwd_ms" in r]
    if ok:
        best = min(ok, key=lambda r: r["fwd_bwd_ms"])
        benchmark.emit({"bench": "attention_tune_best", **best})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", type=int, metavar="SEQ_LEN",
                        help="sweep block sizes at this sequence length instead")
    parser.add_argument("--prefix", type=int, default=None, help="prefix length for --tune")
    parser.add_argument("--seq-lens", type=int, nargs="*", help="override the sequence lengths")
    args = parser.parse_args(argv)
    if args.tune:
        tune(args.tune, None, args.prefix)
        return
    config = {"seq_lens": tuple(args.seq_lens)} if args.seq_lens else None
    for row in run_bench(config):
        benchmark.emit(row)


if __name__ == "__main__":
    main()
