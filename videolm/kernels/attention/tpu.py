"""Flash attention for TPU (Pallas Mosaic): forward, dq and dk/dv kernels.

Layout: q [B, H, S, D], k/v [B, KVH, S, D] (heads-major so every tile is a (rows, D)
matrix); S is a multiple of every block size and the blocks are multiples of 128.

Grids put the reduction axis last ("arbitrary") and keep the running softmax statistics
and accumulators in VMEM scratch. The per-block metadata (see ``block_mask.py``) is
scalar-prefetched into SMEM and used twice:

  * in the index maps: a key (query) block outside the non-empty range of its row
    (column) is clamped to the range's edge, so the pipeline re-uses the block already
    in VMEM and issues no DMA for skipped tiles;
  * in the kernel: EMPTY tiles are skipped, FULL tiles run without mask arithmetic and
    only PARTIAL tiles build the mask from q_lim and segment ids.

Per-row vectors follow Mosaic's layouts: "column" vectors (one value per row of the
tile) are replicated over 128 lanes ([.., S, 128]) and "row" vectors (one value per
column) over 8 sublanes ([.., 8, S]). The dk/dv kernel works on transposed tiles
(keys x queries) so that both of its matmuls are plain ones.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from videolm.kernels.attention import block_mask as bm

LANES, SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _as_col(x):
    """[B, S] or [B, H, S] -> [..., S, 128] (lane-replicated)."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _as_row(x):
    """[B, S] or [B, H, S] -> [..., 8, S] (sublane-replicated)."""
    return jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (SUBLANES, x.shape[-1]))


def _metadata(q_lim, segment_ids, block_q, block_k):
    """Flat int32 SMEM arrays: query-block bounds, key-block bounds and visible ranges."""
    bounds = bm.block_bounds(q_lim, segment_ids, block_q, block_k)
    kinds = bm.block_kinds(bounds, block_k)
    (k_first, k_last), (q_first, q_last) = bm.visible_ranges(kinds)
    b, nq = bounds["lim_lo"].shape
    nk = bounds["num_k_blocks"]
    zq, zk = jnp.zeros((b, nq), jnp.int32), jnp.zeros((b, nk), jnp.int32)
    seg = segment_ids is not None
    q_meta = jnp.stack([bounds["lim_lo"], bounds["lim_hi"],
                        bounds["qs_lo"] if seg else zq, bounds["qs_hi"] if seg else zq], -1)
    k_meta = jnp.stack([bounds["ks_lo"] if seg else zk, bounds["ks_hi"] if seg else zk], -1)
    k_range = jnp.stack([k_first, k_last], -1)
    q_range = jnp.stack([q_first, q_last], -1)
    return tuple(x.reshape(-1).astype(jnp.int32) for x in (q_meta, k_meta, k_range, q_range))


def _tile_kind(q_meta, k_meta, b, i, j, nq, nk, block_k):
    qo, ko = (b * nq + i) * 4, (b * nk + j) * 2
    k_lo = j * block_k
    return bm.tile_kind(q_meta[qo], q_meta[qo + 1], k_lo, k_lo + block_k - 1,
                        q_meta[qo + 2], q_meta[qo + 3], k_meta[ko], k_meta[ko + 1])


def _clamp(idx, range_ref, row):
    first, last = range_ref[2 * row], range_ref[2 * row + 1]
    return jnp.minimum(jnp.maximum(idx, first), jnp.maximum(last, first))


def _live(idx, range_ref, row):
    return (idx >= range_ref[2 * row]) & (idx <= range_ref[2 * row + 1])


def _dispatch(kind, live, compute):
    """Runs compute(masked) for FULL (unmasked) and PARTIAL (masked) tiles; skips EMPTY."""
    pl.when(live & (kind == bm.FULL))(lambda: compute(False))
    pl.when(live & (kind == bm.PARTIAL))(lambda: compute(True))


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(q_meta, k_meta, k_range, q_ref, k_ref, v_ref, qlim_ref, qseg_ref, kseg_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, *, sm_scale, nq, nk, block_k):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            mask = k_pos <= qlim_ref[:, :1]
            if qseg_ref is not None:
                mask = mask & (qseg_ref[:, :1] == kseg_ref[:1, :])
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new[:, :1])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv

    _dispatch(_tile_kind(q_meta, k_meta, b, i, j, nq, nk, block_k),
              _live(j, k_range, b * nq + i), compute)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[...]
        inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
        o_ref[...] = (acc_scr[...] * inv[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0.0, m_scr[...] + jnp.log(l), jnp.inf)


def forward(q, k, v, q_lim, segment_ids, *, sm_scale, block_q, block_k, interpret=False):
    """Returns (out [B, H, S, D] in q.dtype, lse [B, H, S] f32; +inf for empty rows)."""
    b, h, s, d = q.shape
    kvh = k.shape[1]
    group = h // kvh
    nq, nk = s // block_q, s // block_k
    q_meta, k_meta, k_range, _ = _metadata(q_lim, segment_ids, block_q, block_k)
    seg = segment_ids is not None

    def kv_map(bi, hi, i, j, qm, km, kr):
        return bi, lax.div(hi, group), _clamp(j, kr, bi * nq + i), 0

    def kseg_map(bi, hi, i, j, qm, km, kr):
        return bi, 0, _clamp(j, kr, bi * nq + i)

    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    col_spec = pl.BlockSpec((None, block_q, LANES), lambda bi, hi, i, j, *_: (bi, i, 0))
    in_specs = [q_spec, pl.BlockSpec((None, None, block_k, d), kv_map),
                pl.BlockSpec((None, None, block_k, d), kv_map), col_spec,
                col_spec if seg else None,
                pl.BlockSpec((None, SUBLANES, block_k), kseg_map) if seg else None]
    out_specs = [q_spec, pl.BlockSpec((None, None, block_q, LANES),
                                      lambda bi, hi, i, j, *_: (bi, hi, i, 0))]
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, nq=nq, nk=nk, block_k=block_k)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, s, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="videolm_flash_fwd",
    )(q_meta, k_meta, k_range, q, k, v, _as_col(q_lim),
      _as_col(segment_ids) if seg else None, _as_row(segment_ids) if seg else None)
    return out, lse[..., 0]


# ---------------------------------------------------------------------------- backward

def _dq_kernel(q_meta, k_meta, k_range, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qlim_ref,
               qseg_ref, kseg_ref, dq_ref, dq_scr, *, sm_scale, nq, nk, block_k):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * sm_scale
        p = jnp.exp(s - lse_ref[:, :1])
        if masked:
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            mask = k_pos <= qlim_ref[:, :1]
            if qseg_ref is not None:
                mask = mask & (qseg_ref[:, :1] == kseg_ref[:1, :])
            p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:, :1])
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                       preferred_element_type=jnp.float32)

    _dispatch(_tile_kind(q_meta, k_meta, b, i, j, nq, nk, block_k),
              _live(j, k_range, b * nq + i), compute)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_meta, k_meta, q_range, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qlim_ref,
                qseg_ref, kseg_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, sm_scale, nq, nk,
                block_k, group):
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = lax.rem(t, nq)

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        # Transposed tiles: keys in rows, queries in columns.
        s = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * sm_scale
        p = jnp.exp(s - lse_ref[:1, :])
        if masked:
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            mask = k_pos <= qlim_ref[:1, :]
            if qseg_ref is not None:
                mask = mask & (kseg_ref[:, :1] == qseg_ref[:1, :])
            p = jnp.where(mask, p, 0.0)
        dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, NN,
                                       preferred_element_type=jnp.float32)
        dp = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[:1, :])
        dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, NN,
                                       preferred_element_type=jnp.float32)

    _dispatch(_tile_kind(q_meta, k_meta, b, i, j, nq, nk, block_k),
              _live(i, q_range, b * nk + j), compute)

    @pl.when(t == group * nq - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_lim, segment_ids, out, lse, do, *, sm_scale, block_q_dq, block_k_dq,
             block_q_dkv, block_k_dkv, interpret=False):
    """Gradients (dq, dk, dv) in the input dtypes; lse is the forward's [B, H, S]."""
    b, h, s, d = q.shape
    kvh = k.shape[1]
    group = h // kvh
    seg = segment_ids is not None
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, S]
    cp = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                   "arbitrary"))

    # dq: grid (B, H, query blocks, key blocks), reduction over key blocks.
    bq, bk = block_q_dq, block_k_dq
    nq, nk = s // bq, s // bk
    q_meta, k_meta, k_range, _ = _metadata(q_lim, segment_ids, bq, bk)

    def kv_map(bi, hi, i, j, qm, km, kr):
        return bi, lax.div(hi, group), _clamp(j, kr, bi * nq + i), 0

    def kseg_map(bi, hi, i, j, qm, km, kr):
        return bi, 0, _clamp(j, kr, bi * nq + i)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    head_col = pl.BlockSpec((None, None, bq, LANES), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    col_spec = pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, *_: (bi, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, nq=nq, nk=nk, block_k=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk),
            in_specs=[q_spec, pl.BlockSpec((None, None, bk, d), kv_map),
                      pl.BlockSpec((None, None, bk, d), kv_map), q_spec, head_col, head_col,
                      col_spec, col_spec if seg else None,
                      pl.BlockSpec((None, SUBLANES, bk), kseg_map) if seg else None],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp, interpret=interpret, name="videolm_flash_dq",
    )(q_meta, k_meta, k_range, q, k, v, do, _as_col(lse), _as_col(di), _as_col(q_lim),
      _as_col(segment_ids) if seg else None, _as_row(segment_ids) if seg else None)

    # dk, dv: grid (B, KVH, key blocks, group * query blocks), reduction over the
    # query blocks of every query head sharing this key/value head.
    bq, bk = block_q_dkv, block_k_dkv
    nq, nk = s // bq, s // bk
    q_meta, k_meta, _, q_range = _metadata(q_lim, segment_ids, bq, bk)

    def q_map(bi, hk, j, t, qm, km, qr):
        return bi, hk * group + lax.div(t, nq), _clamp(lax.rem(t, nq), qr, bi * nk + j), 0

    def q_row_map(bi, hk, j, t, qm, km, qr):
        return bi, hk * group + lax.div(t, nq), 0, _clamp(lax.rem(t, nq), qr, bi * nk + j)

    def row_map(bi, hk, j, t, qm, km, qr):
        return bi, 0, _clamp(lax.rem(t, nq), qr, bi * nk + j)

    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hk, j, t, *_: (bi, hk, j, 0))
    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    head_row = pl.BlockSpec((None, None, SUBLANES, bq), q_row_map)
    row_spec = pl.BlockSpec((None, SUBLANES, bq), row_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, nq=nq, nk=nk, block_k=bk,
                          group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, kvh, nk, group * nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, head_row, head_row, row_spec,
                      row_spec if seg else None,
                      pl.BlockSpec((None, bk, LANES),
                                   lambda bi, hk, j, t, *_: (bi, j, 0)) if seg else None],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32),
                            pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cp, interpret=interpret, name="videolm_flash_dkv",
    )(q_meta, k_meta, q_range, q, k, v, do, _as_row(lse), _as_row(di), _as_row(q_lim),
      _as_row(segment_ids) if seg else None, _as_col(segment_ids) if seg else None)
    return dq, dk, dv
