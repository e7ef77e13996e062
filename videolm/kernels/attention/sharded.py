"""The flash-attention kernel under ``jax.shard_map``: each device attends its own batch
rows and heads (attention never mixes either, so no communication is needed)."""
from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, PartitionSpec

from videolm import parallel
from videolm.kernels.attention.flash import flash_attention

DEFAULT_LOGICAL_AXES = ("batch", None, "act_heads", None)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def q_spec_from_rules(rules, logical_axes=DEFAULT_LOGICAL_AXES) -> PartitionSpec:
    """PartitionSpec of q [B, S, H, D] from logical-axis rules (``videolm.parallel``)."""
    return parallel.logical_to_spec(logical_axes, rules)


def sharded_flash_attention(q, k, v, *, mesh: Mesh | None = None,
                            q_spec: PartitionSpec | None = None, rules=None, prefix_len=None,
                            segment_ids=None, **kernel_kwargs):
    """``flash_attention`` run per shard of batch and heads.

    mesh: a Mesh, or None for the mesh set by ``jax.set_mesh`` (no mesh set: the kernel
    runs unsharded).
    q_spec: how q [B, S, H, D] is laid out over ``mesh``; only the batch and head entries
    may be set (the sequence and head_dim must be whole on each device). Without q_spec it
    comes from ``rules`` (logical names ``('batch', None, 'act_heads', None)``), and without
    rules it is batch over ('data', 'fsdp') and heads over 'tensor' (axes the mesh lacks
    are dropped). k/v heads are split the same way when their count allows it; a single
    k/v head (MQA) is replicated. Other arguments as for ``flash_attention``.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return flash_attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids,
                                   **kernel_kwargs)
    if q_spec is None:
        if rules is not None:
            q_spec = q_spec_from_rules(rules)
        else:
            batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
            q_spec = PartitionSpec(batch or None, None,
                                   "tensor" if "tensor" in mesh.axis_names else None, None)
    q_spec = PartitionSpec(*(tuple(q_spec) + (None,) * (4 - len(q_spec))))
    if q_spec[1] is not None or q_spec[3] is not None:
        raise ValueError(f"q_spec {q_spec}: the sequence and head_dim axes must not be sharded")
    batch_entry, head_entry = q_spec[0], q_spec[2]
    for entry, dim, name in ((batch_entry, q.shape[0], "batch"), (head_entry, q.shape[2], "heads")):
        ways = math.prod(mesh.shape[a] for a in _axes(entry))
        if dim % ways:
            raise ValueError(f"q_spec {q_spec}: {name}={dim} is not divisible by the {ways} "
                             f"devices of mesh axes {_axes(entry)}")
    head_ways = math.prod(mesh.shape[a] for a in _axes(head_entry))
    kv_heads = k.shape[2]
    if kv_heads % head_ways == 0:
        kv_head_entry = head_entry
    elif kv_heads == 1:
        kv_head_entry = None  # MQA: every device keeps the one k/v head
    else:
        raise ValueError(f"{kv_heads} k/v heads cannot follow q heads split {head_ways} ways "
                         f"over {_axes(head_entry)}; use a multiple of {head_ways} or 1")
    kv_spec = PartitionSpec(batch_entry, None, kv_head_entry, None)
    row_spec = PartitionSpec(batch_entry)
    seg_spec = PartitionSpec(batch_entry, None)

    def local(q, k, v, prefix_len, segment_ids):
        return flash_attention(q, k, v, prefix_len=prefix_len, segment_ids=segment_ids,
                               **kernel_kwargs)

    in_specs = (q_spec, kv_spec, kv_spec, None if prefix_len is None else row_spec,
                None if segment_ids is None else seg_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, k, v, prefix_len, segment_ids)
