"""Flash-attention kernels (interpreted on CPU) against the dense reference.

Both backends run through their Pallas interpreters: "tpu" with pltpu.InterpretParams
(checks block bounds like the hardware) and "gpu" with the generic interpreter. Every
case compares the output and dq, dk, dv with the f32 dense reference under fixed
tolerances. Batch rows carry different prefix lengths so one compiled call covers the
prefix cases (0, 1, mid-block, block-aligned, whole sequence).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from videolm import parallel
from videolm.kernels.attention import (BlockSizes, flash_attention, mask_block_stats,
                                       reference_attention, sharded_flash_attention,
                                       visibility_limits, xla_attention)
from videolm.kernels.attention import block_mask as bm
from videolm.kernels.attention import gpu, tpu
from videolm.kernels.attention.block_sizes import get_block_sizes, uniform

# Absolute tolerances on outputs and gradients of O(1) inputs: f32 is accumulation-order
# noise; bf16 is the rounding of p and ds to bf16 before the matmuls.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}
# Per backend: test block size, and prefixes 0, 1, mid-block, block-aligned, whole sequence.
CASES = {"tpu": dict(block=128, seq=300, prefixes=(0, 1, 64, 128, 300)),
         "gpu": dict(block=32, seq=100, prefixes=(0, 1, 48, 64, 100))}
PREFIX_NAMES = ("prefix0", "prefix1", "mid_block", "block_aligned", "full")
# Interpreted kernels are big programs: compile them without LLVM's expensive passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    """jax.jit(fn)(*args), compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _inputs(b, s, h, kvh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _packed_segments(b, s, cuts):
    """int32 [b, s]: segment id increments at every position in cuts (unaligned on purpose)."""
    return jnp.broadcast_to(jnp.searchsorted(jnp.asarray(cuts), jnp.arange(s), side="right"),
                            (b, s)).astype(jnp.int32)


def _out_and_grads(backend, block, causal, has_segments):
    """fn(q, k, v, do, prefix_len, segment_ids) -> (out, dq, dk, dv) of the kernel
    (backend None: of the dense reference)."""
    attn = reference_attention
    if backend is not None:
        attn = functools.partial(flash_attention, backend=backend, block_sizes=uniform(block))

    def run(q, k, v, do, prefix_len, segment_ids):
        fn = lambda q, k, v: attn(q, k, v, prefix_len=prefix_len,  # noqa: E731
                                  segment_ids=segment_ids if has_segments else None,
                                  causal=causal)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(do)
    return run


def _errors(backend, dtype, *, b, s, h, kvh, d, prefix_len, segment_ids=None, causal=True,
            block=None):
    """Per batch row max |kernel - reference| for out, dq, dk, dv: float array [4, b]."""
    q, k, v, do = _inputs(b, s, h, kvh, d, dtype)
    block = block or CASES[backend]["block"]
    args = (q, k, v, do, jnp.asarray(prefix_len, jnp.int32),
            jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids)
    got = _run(_out_and_grads(backend, block, causal, segment_ids is not None), *args)
    up = [x.astype(jnp.float32) for x in args[:4]]
    want = _run(_out_and_grads(None, None, causal, segment_ids is not None), *up, *args[4:])
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    return np.stack([np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w)),
                            axis=tuple(range(1, g.ndim))) for g, w in zip(got, want)])


def _check(errors, dtype, names):
    tol = TOL[dtype]
    for row, name in enumerate(names):
        for which, err in zip(("out", "dq", "dk", "dv"), errors[:, row]):
            assert err <= tol, f"{name} {which}: max error {err:.3g} > {tol}"


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_prefix_lm_cases_f32_unaligned_length(backend):
    """Also an unaligned head_dim (24: a full-width tile on TPU, padded to 32 on GPU)."""
    case = CASES[backend]
    prefixes = case["prefixes"]
    errors = _errors(backend, jnp.float32, b=len(prefixes), s=case["seq"], h=1, kvh=1, d=24,
                     prefix_len=prefixes)
    _check(errors, jnp.float32, PREFIX_NAMES)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_segments_mqa_f32(backend):
    case = CASES[backend]
    s, blk = case["seq"], case["block"]
    # Segments cut mid-block and on a block edge. Rows: causal, a prefix, and a prefix
    # covering everything, which is exactly causal=False (same visibility limits, see
    # test_visibility_limits).
    seg = _packed_segments(3, s, [blk // 2 + 3, blk * 2, s - 5])
    errors = _errors(backend, jnp.float32, b=3, s=s, h=2, kvh=1, d=32,
                     prefix_len=(0, blk + 10, s), segment_ids=seg)
    _check(errors, jnp.float32, ("segments_causal", "segments_prefix", "segments_bidirectional"))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bf16_prefix_gqa(backend):
    case = CASES[backend]
    errors = _errors(backend, jnp.bfloat16, b=1, s=case["seq"], h=4, kvh=2, d=32,
                     prefix_len=(case["prefixes"][2],))
    _check(errors, jnp.bfloat16, ("bf16_gqa_mid_block",))


@pytest.mark.parametrize("module", [tpu, gpu], ids=["tpu", "gpu"])
def test_query_without_visible_keys_gives_zeros_not_nan(module):
    """Rows whose limit is below every key (only reachable through the raw kernels)."""
    b, s, h, d = 1, 256, 1, 32
    blk = 128 if module is tpu else 32
    q, k, v, do = _inputs(b, s, h, h, d, jnp.float32)
    q_lim = visibility_limits(b, s, causal=True).at[0, :5].set(-1)  # rows 0..4 see nothing
    seg = jnp.zeros((b, s), jnp.int32)
    heads_major = module is tpu
    interpret = pltpu.InterpretParams() if module is tpu else True
    kw = dict(sm_scale=d ** -0.5, interpret=interpret)

    def run(q, k, v, do):
        if heads_major:
            q, k, v, do = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
        out, lse = module.forward(q, k, v, q_lim, seg, block_q=blk, block_k=blk, **kw)
        grads = module.backward(q, k, v, q_lim, seg, out, lse, do, block_q_dq=blk,
                                block_k_dq=blk, block_q_dkv=blk, block_k_dkv=blk, **kw)
        outs = (out,) + grads
        return tuple(x.transpose(0, 2, 1, 3) for x in outs) if heads_major else outs

    out, dq, dk, dv = _run(run, q, k, v, do)
    for x in (out, dq, dk, dv):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert float(jnp.max(jnp.abs(out[:, :5]))) == 0.0
    assert float(jnp.max(jnp.abs(dq[:, :5]))) == 0.0
    # The other rows are plain causal attention.
    want = reference_attention(q, k, v)
    assert float(jnp.max(jnp.abs(out[:, 5:] - want[:, 5:]))) <= TOL[jnp.float32]


def test_sharded_kernel_matches_unsharded_reference(num_fake_devices):
    assert num_fake_devices == 8
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b, s, h, kvh, d = 4, 64, 4, 2, 16
    q, k, v, do = _inputs(b, s, h, kvh, d, jnp.float32, seed=1)
    prefix = jnp.array([0, 9, 33, 64], jnp.int32)
    seg = _packed_segments(b, s, [40])

    def loss(attn, q, k, v):
        out = attn(q, k, v, prefix_len=prefix, segment_ids=seg)
        return jnp.sum(out * do), out

    sharded = functools.partial(sharded_flash_attention, mesh=mesh, backend="gpu",
                                block_sizes=uniform(16))
    spec = P(("data", "fsdp"), None, "tensor", None)
    put = lambda x, sp: jax.device_put(x, jax.NamedSharding(mesh, sp))  # noqa: E731
    qs, ks, vs = put(q, spec), put(k, spec), put(v, spec)
    grad_fn = jax.grad(functools.partial(loss, sharded), argnums=(0, 1, 2), has_aux=True)
    grads, out = _run(grad_fn, qs, ks, vs)
    assert out.sharding.spec[0] == ("data", "fsdp") and out.sharding.spec[2] == "tensor"
    want_grads, want = jax.grad(functools.partial(loss, reference_attention), argnums=(0, 1, 2),
                                has_aux=True)(q, k, v)
    assert float(jnp.max(jnp.abs(out - want))) <= TOL[jnp.float32]
    for g, w in zip(grads, want_grads):
        assert float(jnp.max(jnp.abs(g - w))) <= TOL[jnp.float32]
    # The same from the mesh in context and logical rules (as the model calls it).
    rules = (("batch", ("data", "fsdp")), ("act_heads", "tensor"))
    ctx = functools.partial(sharded_flash_attention, rules=rules, backend="gpu",
                            block_sizes=uniform(16))
    with jax.set_mesh(mesh):
        out_ctx = _run(lambda q, k, v: ctx(q, k, v, prefix_len=prefix, segment_ids=seg), qs, ks, vs)
    assert float(jnp.max(jnp.abs(out_ctx - want))) <= TOL[jnp.float32]


def test_sharded_rejects_kv_heads_that_cannot_follow_q_heads():
    mesh = parallel.make_mesh({"tensor": 4}, devices=jax.devices()[:4])
    q, k, v, _ = _inputs(1, 16, 8, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="k/v heads"):
        sharded_flash_attention(q, k, v, mesh=mesh)


# ------------------------------------------------------------------ block classification

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_kinds_agree_with_dense_mask(seed):
    rng = np.random.default_rng(seed)
    b, s, bq, bk = 3, 96, 16, 32
    prefix = rng.integers(0, s + 1, size=b)
    cuts = np.sort(rng.integers(1, s, size=3))
    seg = np.broadcast_to(np.searchsorted(cuts, np.arange(s), side="right"), (b, s))
    for causal in (True, False):
        for segment_ids in (None, seg):
            q_lim = np.asarray(visibility_limits(b, s, jnp.asarray(prefix), causal=causal))
            mask = q_lim[:, :, None] >= np.arange(s)[None, None, :]
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
            kinds = bm.block_kinds(bm.block_bounds(q_lim, segment_ids, bq, bk, xp=np), bk,
                                   xp=np)
            tiles = mask.reshape(b, s // bq, bq, s // bk, bk).transpose(0, 1, 3, 2, 4)
            any_, all_ = tiles.any((-1, -2)), tiles.all((-1, -2))
            assert np.all(~any_[kinds == bm.EMPTY]), "an EMPTY tile has a visible key"
            assert np.all(all_[kinds == bm.FULL]), "a FULL tile has a masked key"
            # Exact for sorted segments: nothing visible is ever called EMPTY and a
            # uniformly visible tile is never left PARTIAL.
            assert np.all(kinds[~any_] == bm.EMPTY)
            assert np.all(kinds[all_] == bm.FULL)


def test_mask_block_stats_closed_forms():
    n = 8  # 1024 / 128 blocks per side
    causal = mask_block_stats(1024, None, block_q=128, block_k=128)
    assert causal["computed"] == pytest.approx(n * (n + 1) / 2 / n ** 2)
    assert causal["full"] == pytest.approx(n * (n - 1) / 2 / n ** 2)
    assert causal["skipped"] == pytest.approx(1 - causal["computed"])
    # A block-aligned prefix of 2 blocks makes the first 2 key columns visible to all.
    pre = mask_block_stats(1024, 256, block_q=128, block_k=128)
    assert pre["computed"] == pytest.approx((n * (n + 1) / 2 + 1) / n ** 2)
    assert mask_block_stats(1024, 1024, block_q=128, block_k=128)["full"] == 1.0
    assert mask_block_stats(1000, 0, causal=False, block_q=128, block_k=128)["skipped"] == 0.0


def test_visibility_limits():
    lim = visibility_limits(2, 6, jnp.array([0, 4]))
    np.testing.assert_array_equal(lim, [[0, 1, 2, 3, 4, 5], [3, 3, 3, 3, 4, 5]])
    np.testing.assert_array_equal(visibility_limits(2, 6, None), visibility_limits(2, 6, [0, 1]))
    np.testing.assert_array_equal(visibility_limits(1, 4, [9]), [[3, 3, 3, 3]])
    np.testing.assert_array_equal(visibility_limits(1, 3, None, causal=False), [[2, 2, 2]])
    np.testing.assert_array_equal(visibility_limits(2, 5, None, causal=False),
                                  visibility_limits(2, 5, [5, 5]))


def test_xla_reference_agrees_with_dense_reference():
    q, k, v, _ = _inputs(2, 40, 4, 2, 16, jnp.float32)
    kw = dict(prefix_len=jnp.array([3, 17]), segment_ids=_packed_segments(2, 40, [11, 30]))
    got = _run(functools.partial(xla_attention, **kw), q, k, v)
    want = _run(functools.partial(reference_attention, **kw), q, k, v)
    assert float(jnp.max(jnp.abs(got - want))) <= TOL[jnp.float32]


# -------------------------------------------------------------------- lowering, errors

def test_lowers_for_tpu_mosaic_and_gpu_triton():
    b, s, h, kvh, d = 2, 1024, 4, 2, 128
    args = (jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32))
    targets = {"tpu": ("tpu", "tpu_custom_call", ()),
               "gpu": ("cuda", "__gpu$xla.gpu.triton",
                       [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])}
    for backend, (platform, target, checks) in targets.items():
        def fwd_bwd(q, k, v, prefix_len, segment_ids):
            fn = lambda q, k, v: flash_attention(  # noqa: E731
                q, k, v, prefix_len=prefix_len, segment_ids=segment_ids, backend=backend,
                interpret=False)
            out, vjp = jax.vjp(fn, q, k, v)
            return vjp(out)
        exported = jax.export.export(jax.jit(fwd_bwd), platforms=[platform],
                                     disabled_checks=checks)(*args)
        assert exported.mlir_module().count(f"@{target}(") == 3, backend  # fwd, dq, dkv


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = _inputs(2, 32, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="prefix_len"):
        flash_attention(q, k, v, prefix_len=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((2, 31), jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, k, v, backend="tpu", block_sizes=uniform(64))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, backend="gpu", block_sizes=uniform(48))


def test_bench_rows():
    """The bench's accelerator code path, run tiny on CPU (interpreted kernel, xla)."""
    from videolm.kernels.attention import bench
    opts = bench._options({"seq_lens": (64,), "batch": 1, "num_heads": 2, "num_kv_heads": 1,
                           "head_dim": 16, "dtype": "float32", "steps": 1, "warmup": 1})
    rows = bench.speed_rows(opts, on_accelerator=True)
    assert [r["mask"] for r in rows] == ["causal", "prefix_256", "prefix_1536"]
    for row in rows:
        assert row["kernel_fwd_ms"] > 0 and row["xla_fwd_bwd_ms"] > 0, row
        assert row["skipped_frac"] + row["full_frac"] + row["partial_frac"] == pytest.approx(1)
    assert rows[1]["prefix_len"] == 64 and rows[1]["full_frac"] == 1.0  # prefix covers all
    with pytest.raises(ValueError, match="unknown options"):
        bench._options({"seq_len": 5})


def test_block_size_table():
    sizes = get_block_sizes("tpu", 8192, 128, jnp.bfloat16)
    assert isinstance(sizes, BlockSizes) and all(x % 128 == 0 for x in sizes.all())
    assert max(get_block_sizes("tpu", 200, 64, jnp.float32).all()) == 256  # clipped
    assert max(get_block_sizes("gpu", 20, 64, jnp.float32).all()) == 32


def test_model_step_with_kernel_matches_reference():
    """Loss and parameter gradients of the LM with attention_impl='pallas' (the kernel,
    interpreted) equal those with the dense reference."""
    from flax import nnx
    from videolm.model.transformer import PrefixLM

    config = dict(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 40), 0, 64)
    prefix = jnp.array([7, 20], jnp.int32)

    def loss_and_grads(impl):
        graphdef, state = nnx.split(PrefixLM(**config, attention_impl=impl, rngs=nnx.Rngs(0)))

        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1], prefix_len=prefix)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return _run(jax.value_and_grad(loss), state)

    (loss_k, grads_k), (loss_r, grads_r) = loss_and_grads("pallas"), loss_and_grads("reference")
    assert abs(float(loss_k) - float(loss_r)) <= TOL[jnp.float32]
    for gk, gr in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_r)):
        assert float(jnp.max(jnp.abs(gk - gr))) <= TOL[jnp.float32] * max(1.0, float(jnp.max(jnp.abs(gr))))
