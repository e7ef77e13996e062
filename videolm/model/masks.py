"""Prefix-LM attention masks and loss weights from compact per-example metadata.

VideoPoet's sequences are ``[prefix | outputs]``: the prefix (task, text, visual and audio
conditions, up to ``<res>``) attends bidirectionally, outputs attend causally, and the loss counts
outputs only. A batch describes this with

* ``prefix_len`` int [B]: the number of prefix positions of each row,
* ``segment_ids`` int [B, S] (optional): packed or grouped sequences; a position attends only to
  positions of the same segment. Id 0 marks padding, which carries no loss.

Query i may attend key j iff ``segment[i] == segment[j]`` and (``j < prefix_len`` or ``j <= i``).
Every query attends at least itself, so no softmax row is empty.
"""
from __future__ import annotations

import jax.numpy as jnp


def prefix_lm_mask(seq_len: int, prefix_len=None, segment_ids=None, *, batch_size: int | None = None):
    """Boolean mask [B, 1, S, S] (True = may attend); ``prefix_len=None`` is plain causal."""
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    allowed = (j <= i)[None]
    if prefix_len is not None:
        prefix_len = jnp.asarray(prefix_len).reshape(-1, 1, 1)
        allowed = allowed | (j[None] < prefix_len)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if allowed.shape[0] == 1 and batch_size is not None:
        allowed = jnp.broadcast_to(allowed, (batch_size, seq_len, seq_len))
    return allowed[:, None]


def output_mask(seq_len: int, prefix_len, input_segment_ids=None, target_segment_ids=None):
    """Float [B, S]: 1 where the target of input position t is an output token to be predicted.

    Inputs are ``tokens[:, :-1]`` and targets ``tokens[:, 1:]``: the logit at input position t
    predicts token t + 1, which is an output iff ``t + 1 >= prefix_len``. With segment ids (of the
    inputs and of the targets, i.e. ``segment_ids[:, :-1]`` and ``segment_ids[:, 1:]``), padding
    targets (segment 0) and targets in another segment than their input carry no loss.
    """
    t = jnp.arange(seq_len)[None, :]
    prefix_len = jnp.asarray(prefix_len).reshape(-1, 1)
    weights = t + 1 >= prefix_len
    if (input_segment_ids is None) != (target_segment_ids is None):
        raise ValueError("output_mask: give both input and target segment ids, or neither")
    if input_segment_ids is not None:
        weights = weights & (target_segment_ids != 0) & (target_segment_ids == input_segment_ids)
    return weights.astype(jnp.float32)
