"""Device mesh, logical-axis sharding rules and sharded initialisation.

Everything parallel in videolm goes through this module. Models name their parameter and
activation axes logically (``('embed', 'mlp')``, ``('batch', 'length', 'heads')``); a config maps
those names to the mesh axes ``('data', 'fsdp', 'tensor')``. Changing the parallelism of a run is a
config change only::

    config.mesh = dict(data=-1, fsdp=1, tensor=1)          # -1: all remaining devices
    config.logical_axis_rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'))

Parameters are created already sharded: ``jax.eval_shape`` of the constructor gives the abstract
state, the rules give its shardings, and ``jax.jit(init, out_shardings=...)`` materialises each
shard on its own device (no host ever holds the whole model).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LogicalRules = Sequence[tuple[str, Any]]


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for ``MESH_AXES`` from a config dict; at most one axis may be -1 (the rest)."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(mesh_shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(mesh_shape)}: axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(mesh_shape)}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(mesh_shape)} needs {math.prod(sizes)} devices, but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh with Auto axes over ``devices`` (default: all)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    Each name takes the first rule whose mesh axes are still unused in this spec (a mesh axis
    shards at most one dimension); names without a usable rule, and ``None``, are replicated.
    """
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        chosen = None
        for logical, mesh_axes in rules:
            if name is None or logical != name:
                continue
            axes = () if mesh_axes is None else (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,))
            if used.isdisjoint(axes):
                chosen = mesh_axes if axes else None
                used.update(axes)
                break
        spec.append(chosen)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, rules: LogicalRules, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules):
    """Sets the mesh and the logical rules for everything traced or created inside."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
        yield mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside ``use_mesh`` (single device)."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def _variable_sharding(variable, mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
    return NamedSharding(mesh, logical_to_spec(names, rules) if names else PartitionSpec())


def init_jitted(ctor: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds ``ctor()`` on the default device in one compiled program.

    Building a module eagerly runs (and on CPU compiles) one small program per initializer;
    tracing the constructor once, compiled without XLA's optimisation passes (it runs once), is
    several times faster for models with many layers.
    """
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(ctor))
        init = jax.jit(lambda: nnx.split(ctor())[1]).lower().compile(
            compiler_options={"xla_backend_optimization_level": 0})
        state = init()
    return nnx.merge(graphdef, state)


def state_shardings(state, mesh: Mesh, rules: LogicalRules):
    """NamedShardings for an nnx State (or any pytree of Variables) from their logical names.

    A variable's logical names are the ones given with ``nnx.with_partitioning`` (or the
    ``out_sharding`` metadata); unnamed variables are replicated.
    """
    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(_variable_sharding(leaf, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(ctor: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules):
    """(graphdef, abstract state whose leaves carry their shardings) of what ``ctor()`` builds."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(ctor))
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, state


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules) -> nnx.Module:
    """Builds ``ctor()`` with every variable created directly in its sharded layout."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
        shardings = state_shardings(abstract, mesh, rules)
        with use_mesh(mesh, rules):
            state = jax.jit(lambda: nnx.split(ctor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over the ``'batch'`` logical axis, the rest replicated."""
    return logical_sharding(mesh, rules, ("batch",) + (None,) * (ndim - 1))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules) -> dict:
    """Places a host batch (numpy dict, this process's share) onto the mesh as global arrays.

    Works on one host and many: each process contributes its local rows; non-numeric entries
    (captions) are returned unchanged.
    """
    out = {}
    for key, value in batch.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            out[key] = value
            continue
        sharding = batch_sharding(mesh, rules, array.ndim)
        if jax.process_count() == 1:
            out[key] = jax.device_put(array, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, array)
    return out


def data_parallel_size(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways the ``'batch'`` logical axis is split: the global batch must divide by it."""
    spec = logical_to_spec(("batch",), rules)[0]
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    return math.prod(mesh.shape[a] for a in axes)
