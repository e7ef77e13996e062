"""Attention kernels: Pallas flash attention with VideoPoet's prefix-LM masks.

  flash_attention      Pallas kernels (TPU Mosaic / GPU Triton; interpreted on CPU)
  reference_attention  dense f32 reference with the same mask semantics
  xla_attention        jax.nn.dot_product_attention (xla / cudnn) with the same masks
  mask_block_stats     fractions of skipped / full / partial tiles for a mask
  sharded_flash_attention  the kernel inside jax.shard_map over batch and heads
"""
from videolm.kernels.attention.block_mask import mask_block_stats
from videolm.kernels.attention.block_sizes import BlockSizes, get_block_sizes
from videolm.kernels.attention.flash import flash_attention
from videolm.kernels.attention.reference import (reference_attention, visibility_limits,
                                                 xla_attention)
from videolm.kernels.attention.sharded import sharded_flash_attention

__all__ = ["BlockSizes", "flash_attention", "get_block_sizes", "mask_block_stats",
           "reference_attention", "sharded_flash_attention", "visibility_limits",
           "xla_attention"]
