"""Flash attention for GPU (Pallas, Triton lowering): forward, dq and dk/dv kernels.

Layout: q [B, S, H, D], k/v [B, S, KVH, D] (the model's own layout: no transposes);
S is a multiple of every block, blocks and D are powers of two (Triton tiles).

Each program owns one query block (forward, dq) or one key block (dk/dv) and loops over
the other axis inside the kernel, only over the range of tiles the mask leaves
non-empty (see ``block_mask.py``). Without segment ids that range splits into a run of
FULL tiles, computed without mask arithmetic, and a run of PARTIAL tiles; with segment
ids every tile of the range is classified on the fly and EMPTY ones are skipped. The
dk/dv program of a key/value head loops over all query heads of its group (GQA/MQA), so
dk and dv are written once, without a reduction afterwards.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from videolm.kernels.attention import block_mask as bm

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _compiler_params(head_dim):
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile_mask(q_lim, q_seg, k_seg, k_start, block_k, transposed=False):
    """Visibility of a tile from per-row vectors; [bq, bk] (or [bk, bq] if transposed)."""
    k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
    if transposed:
        mask = k_pos[:, None] <= q_lim[None, :]
        if q_seg is not None:
            mask = mask & (k_seg[:, None] == q_seg[None, :])
    else:
        mask = k_pos[None, :] <= q_lim[:, None]
        if q_seg is not None:
            mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


def _split_loop(lo, split, hi, body, carry, *, first_masked):
    """body(idx, carry, masked) over [lo, split) with masked=first_masked, then over
    [split, hi) with the other setting (the no-segment case: FULL and PARTIAL runs)."""
    carry = lax.fori_loop(lo, split, functools.partial(body, masked=first_masked), carry)
    return lax.fori_loop(split, hi, functools.partial(body, masked=not first_masked), carry)


def _classified_loop(lo, hi, body, carry, kind_fn):
    """body(idx, carry, masked) over [lo, hi) by each tile's kind; EMPTY tiles skipped."""
    def step(idx, c):
        kind = kind_fn(idx)
        return lax.cond(
            kind == bm.FULL, lambda c: body(idx, c, masked=False),
            lambda c: lax.cond(kind == bm.PARTIAL, lambda c: body(idx, c, masked=True),
                               lambda c: c, c), c)
    return lax.fori_loop(lo, hi, step, carry)


def _query_block_bounds(qlim_ref, seg_ref, i, block_q):
    rows = pl.ds(i * block_q, block_q)
    q_lim = qlim_ref[rows]
    q_seg = None if seg_ref is None else seg_ref[rows]
    bounds = (jnp.min(q_lim), jnp.max(q_lim))
    seg_bounds = None if q_seg is None else (jnp.min(q_seg), jnp.max(q_seg))
    return q_lim, q_seg, bounds, seg_bounds


def _key_kind_fn(seg_ref, bounds, seg_bounds, block_k):
    """kind of key block j for a fixed query block (segment case)."""
    def kind(j):
        k_seg = seg_ref[pl.ds(j * block_k, block_k)]
        return bm.tile_kind(bounds[0], bounds[1], j * block_k, j * block_k + block_k - 1,
                            seg_bounds[0], seg_bounds[1], jnp.min(k_seg), jnp.max(k_seg))
    return kind


def _key_range(bounds, block_k, num_k_blocks):
    """(#key blocks to visit, #leading FULL ones) from the query block's q_lim bounds."""
    hi = jnp.minimum(lax.div(bounds[1], block_k) + 1, num_k_blocks)
    n_full = jnp.minimum(lax.div(bounds[0] + 1, block_k), hi)
    return hi, n_full


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qlim_ref, seg_ref, o_ref, lse_ref, *, sm_scale, block_q,
                block_k, num_k_blocks):
    i = pl.program_id(0)
    q = q_ref[...]
    q_lim, q_seg, bounds, seg_bounds = _query_block_bounds(qlim_ref, seg_ref, i, block_q)

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        cols = pl.ds(j * block_k, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = _dot(q, k, NT) * sm_scale
        if masked:
            mask = _tile_mask(q_lim, q_seg, None if seg_ref is None else seg_ref[cols],
                              j * block_k, block_k)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, NN)
        return acc, m_new, l_prev * alpha + jnp.sum(p, axis=1)

    d = q.shape[-1]
    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    hi, n_full = _key_range(bounds, block_k, num_k_blocks)
    if seg_ref is None:
        acc, m, l = _split_loop(0, n_full, hi, body, carry, first_masked=False)
    else:
        acc, m, l = _classified_loop(0, hi, body, carry,
                                _key_kind_fn(seg_ref, bounds, seg_bounds, block_k))
    inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0.0, m + jnp.log(l), jnp.inf)


def forward(q, k, v, q_lim, segment_ids, *, sm_scale, block_q, block_k, interpret=False):
    """Returns (out [B, S, H, D] in q.dtype, lse [B, H, S] f32; +inf for empty rows)."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    nq, nk = s // block_q, s // block_k
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, block_q=block_q,
                               block_k=block_k, num_k_blocks=nk)
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0))
    row_spec = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))
    seg = segment_ids is not None
    return pl.pallas_call(
        kernel, grid=(nq, b, h),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec if seg else None],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        compiler_params=_compiler_params(d), interpret=interpret, name="videolm_flash_fwd",
    )(q, k, v, q_lim, segment_ids.astype(jnp.int32) if seg else None)


# ---------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qlim_ref, seg_ref, dq_ref, *,
               sm_scale, block_q, block_k, num_k_blocks):
    i = pl.program_id(0)
    q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
    q_lim, q_seg, bounds, seg_bounds = _query_block_bounds(qlim_ref, seg_ref, i, block_q)

    def body(j, dq, masked):
        cols = pl.ds(j * block_k, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = _dot(q, k, NT) * sm_scale
        p = jnp.exp(s - lse[:, None])
        if masked:
            mask = _tile_mask(q_lim, q_seg, None if seg_ref is None else seg_ref[cols],
                              j * block_k, block_k)
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, NT) - di[:, None])
        return dq + _dot(ds.astype(k.dtype), k, NN)

    dq = jnp.zeros(q.shape, jnp.float32)
    hi, n_full = _key_range(bounds, block_k, num_k_blocks)
    if seg_ref is None:
        dq = _split_loop(0, n_full, hi, body, dq, first_masked=False)
    else:
        dq = _classified_loop(0, hi, body, dq,
                         _key_kind_fn(seg_ref, bounds, seg_bounds, block_k))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qlim_ref, seg_ref, qstart_ref,
                dk_ref, dv_ref, *, sm_scale, block_q, block_k, num_q_blocks, group):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_lo = j * block_k
    cols = pl.ds(k_lo, block_k)
    k_seg = None if seg_ref is None else seg_ref[cols]
    # Query blocks [q_first, q_full) see this key block partially, [q_full, nq) fully
    # (q_lim never decreases); with segment ids each tile is classified on the fly.
    q_first, q_full = qstart_ref[0, j], qstart_ref[1, j]

    def body(i, carry, masked, g):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, di = lse_ref[g, rows], di_ref[g, rows]
        s = _dot(k, q, NT) * sm_scale  # [bk, bq]
        p = jnp.exp(s - lse[None, :])
        if masked:
            mask = _tile_mask(qlim_ref[rows], None if seg_ref is None else seg_ref[rows],
                              k_seg, k_lo, block_k, transposed=True)
            p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, NN)
        ds = p * (_dot(v, do, NT) - di[None, :])
        return dk + _dot(ds.astype(q.dtype), q, NN), dv

    def kind_fn(i):
        rows = pl.ds(i * block_q, block_q)
        q_lim, q_seg = qlim_ref[rows], seg_ref[rows]
        return bm.tile_kind(jnp.min(q_lim), jnp.max(q_lim), k_lo, k_lo + block_k - 1,
                            jnp.min(q_seg), jnp.max(q_seg), jnp.min(k_seg), jnp.max(k_seg))

    def head(g, carry):
        b = functools.partial(body, g=g)
        if seg_ref is None:
            return _split_loop(q_first, q_full, num_q_blocks, b, carry, first_masked=True)
        return _classified_loop(q_first, num_q_blocks, b, carry, kind_fn)

    d = k.shape[-1]
    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_ranges(q_lim, block_q, block_k):
    """[2, B, nk] int32: first query block seeing each key block, first seeing it fully."""
    lim_lo, lim_hi = q_lim[:, ::block_q], q_lim[:, block_q - 1::block_q]
    nk = q_lim.shape[1] // block_k
    k_lo = jnp.arange(nk, dtype=jnp.int32) * block_k
    search = jax.vmap(lambda a, x: jnp.searchsorted(a, x, side="left"), (0, None))
    first = search(lim_hi, k_lo)  # first i with lim_hi(i) >= k_lo
    full = search(lim_lo, k_lo + block_k - 1)  # first i with lim_lo(i) >= k_hi
    return jnp.stack([first, jnp.maximum(full, first)]).astype(jnp.int32)


def backward(q, k, v, q_lim, segment_ids, out, lse, do, *, sm_scale, block_q_dq, block_k_dq,
             block_q_dkv, block_k_dkv, interpret=False):
    """Gradients (dq, dk, dv) in the input dtypes; lse is the forward's [B, H, S]."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    seg = segment_ids is not None
    segment_ids = segment_ids.astype(jnp.int32) if seg else None
    di = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    params = _compiler_params(d)

    bq, bk = block_q_dq, block_k_dq
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    row_spec = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, block_q=bq, block_k=bk,
                          num_k_blocks=s // bk),
        grid=(s // bq, b, h),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec,
                  row_spec if seg else None],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="videolm_flash_dq",
    )(q, k, v, do, lse, di, q_lim, segment_ids)

    bq, bk = block_q_dkv, block_k_dkv
    nk = s // bk
    grouped = lambda x: x.reshape(b, s, kvh, group, d)  # noqa: E731
    q_spec = pl.BlockSpec((None, s, None, group, d), lambda j, bi, hk: (bi, 0, hk, 0, 0))
    vec_spec = pl.BlockSpec((None, None, group, s), lambda j, bi, hk: (bi, hk, 0, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0))
    row_spec = pl.BlockSpec((None, s), lambda j, bi, hk: (bi, 0))
    qstart_spec = pl.BlockSpec((2, None, nk), lambda j, bi, hk: (0, bi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=bq, block_k=bk,
                          num_q_blocks=s // bq, group=group),
        grid=(nk, b, kvh),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec,
                  row_spec if seg else None, qstart_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="videolm_flash_dkv",
    )(grouped(q), k, v, grouped(do), lse.reshape(b, kvh, group, s),
      di.reshape(b, kvh, group, s), q_lim, segment_ids, _query_ranges(q_lim, bq, bk))
    return dq, dk, dv
