"""Block sizes for the attention kernels: a table per backend with a default.

Entries are keyed by (backend, head_dim, dtype) and hold rows (max_seq_len, BlockSizes):
the first row whose max_seq_len covers the (padded) sequence wins. The numbers are
starting points in line with the hardware's tile sizes (TPU: multiples of 128 lanes,
Mosaic's 512-wide defaults for long sequences; GPU: 64-128 wide tiles that keep q, k, v
and the f32 accumulator in shared memory/registers for head_dim <= 128). Re-tune a row
with ``python -m videolm.kernels.attention.bench --tune`` on the target accelerator and
replace it here.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward kernel and of the two backward kernels (dq and dk/dv)."""
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int

    def all(self) -> tuple[int, ...]:
        return (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq,
                self.block_q_dkv, self.block_k_dkv)

    def clipped(self, seq_len: int, minimum: int) -> "BlockSizes":
        """Shrinks every block to the smallest power-of-two multiple of ``minimum`` that
        covers ``seq_len`` (so short sequences are not padded to a huge block)."""
        cover = minimum
        while cover < seq_len:
            cover *= 2
        return BlockSizes(*(min(b, cover) for b in self.all()))


def uniform(block: int) -> BlockSizes:
    return BlockSizes(block, block, block, block, block, block)


# backend -> {(head_dim or None for "any", dtype name or None): [(max_seq_len, sizes), ...]}
TABLE: dict[str, dict[tuple, list[tuple[int, BlockSizes]]]] = {
    "tpu": {
        (None, None): [
            (1024, BlockSizes(256, 512, 256, 512, 256, 512)),
            (1 << 30, BlockSizes(512, 512, 512, 512, 512, 512)),
        ],
    },
    "gpu": {
        (None, "bfloat16"): [
            (1 << 30, BlockSizes(128, 64, 64, 64, 64, 64)),
        ],
        (None, None): [
            (1 << 30, BlockSizes(64, 64, 64, 32, 32, 64)),
        ],
    },
}

# Smallest legal block per backend: TPU tiles put keys in the 128-wide lane dimension;
# Triton needs power-of-two tiles of at least 16 for its dot.
MIN_BLOCK = {"tpu": 128, "gpu": 16}


def get_block_sizes(backend: str, seq_len: int, head_dim: int, dtype) -> BlockSizes:
    """The table's entry for this problem, clipped to the sequence length."""
    if backend not in TABLE:
        raise ValueError(f"no block-size table for backend {backend!r}; expected one of "
                         f"{sorted(TABLE)}")
    dtype_name = np.dtype(dtype).name
    table = TABLE[backend]
    for key in ((head_dim, dtype_name), (None, dtype_name), (head_dim, None), (None, None)):
        if key in table:
            for max_len, sizes in table[key]:
                if seq_len <= max_len:
                    return sizes.clipped(seq_len, MIN_BLOCK[backend])
    raise ValueError(f"block-size table for {backend!r} has no row for seq_len={seq_len}")


def validate(sizes: BlockSizes, backend: str) -> None:
    """Raises a clear error for blocks the backend cannot tile."""
    minimum = MIN_BLOCK[backend]
    for name, b in zip(("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv",
                        "block_k_dkv"), sizes.all()):
        if b < minimum or b % minimum:
            raise ValueError(f"{backend} {name}={b} must be a positive multiple of {minimum}")
        if backend == "gpu" and b & (b - 1):
            raise ValueError(f"gpu {name}={b} must be a power of two (Triton tiles)")
