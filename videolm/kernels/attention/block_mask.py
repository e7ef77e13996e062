"""Block-level view of the mask: which (query block, key block) tiles are empty, full or partial.

Every mask here is "key j visible from query i iff j <= q_lim[i] and seg[i] == seg[j]"
(see ``reference.py``), with q_lim non-decreasing along the sequence. For the tile of
queries [i0, i1] and keys [j0, j1]:

  * by position it is empty iff ``j0 > q_lim[i1]`` and full iff ``j1 <= q_lim[i0]``;
  * by segment it is empty iff the query and key segment-id ranges are disjoint, and full
    iff both blocks hold one and the same segment id.

A tile is EMPTY if either test says empty (skipped: no loads, no FLOPs), FULL if every
test says full (computed without mask arithmetic), PARTIAL otherwise. The segment tests
are conservative for unsorted ids (they may call an empty tile partial, never the
reverse), so the result is always correct. Everything is computed from O(S) metadata.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_kind(lim_lo, lim_hi, k_lo, k_hi, qs_lo=None, qs_hi=None, ks_lo=None, ks_hi=None,
              *, xp=jnp):
    """EMPTY/PARTIAL/FULL from block bounds; broadcasts, works on scalars inside kernels.

    lim_lo/lim_hi: q_lim at the first/last query of the block; k_lo/k_hi: first/last key
    position; qs_*/ks_*: min/max segment id of the query/key block (None: no segments).
    """
    empty = k_lo > lim_hi
    full = k_hi <= lim_lo
    if qs_lo is not None:
        empty = empty | (qs_hi < ks_lo) | (ks_hi < qs_lo)
        full = full & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    # EMPTY=0, PARTIAL=1, FULL=2 by arithmetic (scalar selects lower poorly in kernels).
    not_empty = xp.logical_not(empty).astype(xp.int32)
    return not_empty * (1 + xp.logical_and(full, xp.logical_not(empty)).astype(xp.int32))


def block_bounds(q_lim, segment_ids, block_q: int, block_k: int, *, xp=jnp):
    """Per-block metadata from [B, S] arrays (S a multiple of both blocks).

    Returns a dict of int32 arrays: lim_lo, lim_hi, qs_lo, qs_hi ([B, S // block_q]) and
    ks_lo, ks_hi ([B, S // block_k]), plus the block counts; the segment entries are None
    without segment ids.
    """
    b, s = q_lim.shape
    if s % block_q or s % block_k:
        raise ValueError(f"sequence length {s} must be a multiple of block_q={block_q} "
                         f"and block_k={block_k}")
    nq, nk = s // block_q, s // block_k
    out = {"num_q_blocks": nq, "num_k_blocks": nk,
           "lim_lo": q_lim[:, ::block_q], "lim_hi": q_lim[:, block_q - 1::block_q],
           "qs_lo": None, "qs_hi": None, "ks_lo": None, "ks_hi": None}
    if segment_ids is not None:
        seg = segment_ids.astype(xp.int32)
        out["qs_lo"] = seg.reshape(b, nq, block_q).min(-1)
        out["qs_hi"] = seg.reshape(b, nq, block_q).max(-1)
        out["ks_lo"] = seg.reshape(b, nk, block_k).min(-1)
        out["ks_hi"] = seg.reshape(b, nk, block_k).max(-1)
    return out


def block_kinds(bounds, block_k: int, *, xp=jnp):
    """EMPTY/PARTIAL/FULL for every tile: int32 [B, nq, nk]."""
    lim_lo, lim_hi = bounds["lim_lo"][:, :, None], bounds["lim_hi"][:, :, None]
    k_lo = xp.arange(bounds["num_k_blocks"], dtype=xp.int32)[None, None, :] * block_k
    seg = ()
    if bounds["qs_lo"] is not None:
        seg = (bounds["qs_lo"][:, :, None], bounds["qs_hi"][:, :, None],
               bounds["ks_lo"][:, None, :], bounds["ks_hi"][:, None, :])
    return tile_kind(lim_lo, lim_hi, k_lo, k_lo + block_k - 1, *seg, xp=xp)


def visible_ranges(kinds, *, xp=jnp):
    """First/last non-empty key block per query block and query block per key block.

    kinds: [B, nq, nk]. Returns (k_first, k_last) [B, nq] and (q_first, q_last) [B, nk],
    int32; a row or column with no non-empty tile gets first=0, last=-1.
    """
    def first_last(nonempty, axis):
        n = nonempty.shape[axis]
        idx = xp.arange(n, dtype=xp.int32)
        shape = [1, 1, 1]
        shape[axis] = n
        idx = idx.reshape(shape)
        first = xp.min(xp.where(nonempty, idx, n), axis=axis)
        last = xp.max(xp.where(nonempty, idx, -1), axis=axis)
        first = xp.where(last < 0, 0, first)
        return first.astype(xp.int32), last.astype(xp.int32)

    nonempty = kinds != EMPTY
    return first_last(nonempty, 2), first_last(nonempty, 1)


def mask_block_stats(seq_len: int, prefix_len, *, causal: bool = True, block_q: int,
                     block_k: int, segment_ids=None) -> dict:
    """Fractions of (query block, key block) tiles that are skipped, full and partial.

    prefix_len: an int or a sequence of per-example ints (None: plain causal). The
    sequence is padded up to a multiple of the blocks as the kernel pads it; fractions
    are over all tiles of the padded grid, averaged over examples. Computed on the host
    from the same block tests the kernels use.
    """
    pad = int(np.lcm(block_q, block_k))
    s_pad = -(-seq_len // pad) * pad
    if prefix_len is None:
        prefixes = np.zeros((1,), np.int64)
    else:
        prefixes = np.atleast_1d(np.asarray(prefix_len, np.int64))
    b = prefixes.shape[0]
    pos = np.arange(s_pad)[None, :]
    if causal:
        q_lim = np.minimum(np.maximum(pos, prefixes[:, None] - 1), seq_len - 1)
    else:
        q_lim = np.full((b, s_pad), seq_len - 1)
    seg = None
    if segment_ids is not None:
        seg = np.asarray(segment_ids, np.int64).reshape(-1, seq_len)
        seg = np.pad(seg, ((0, 0), (0, s_pad - seq_len)), mode="edge")
        q_lim = np.broadcast_to(q_lim, seg.shape)
    bounds = block_bounds(q_lim, seg, block_q, block_k, xp=np)
    kinds = block_kinds(bounds, block_k, xp=np)
    n = kinds.size
    skipped = float(np.sum(kinds == EMPTY)) / n
    full = float(np.sum(kinds == FULL)) / n
    partial = float(np.sum(kinds == PARTIAL)) / n
    # The fraction of tiles a plain causal kernel (no prefix, no segments) skips on the
    # same grid: the baseline the prefix-LM kernel is compared with.
    causal_bounds = block_bounds(np.minimum(pos, seq_len - 1), None, block_q, block_k, xp=np)
    causal_kinds = block_kinds(causal_bounds, block_k, xp=np)
    return {"seq_len": seq_len, "padded_len": s_pad, "block_q": block_q, "block_k": block_k,
            "num_tiles": int(kinds[0].size), "skipped": skipped, "full": full,
            "partial": partial, "computed": full + partial,
            "causal_computed": float(np.mean(causal_kinds != EMPTY))}
