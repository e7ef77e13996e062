"""Mesh construction, logical-axis rules and sharded initialisation on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from videolm import parallel

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("vocab", "tensor"), ("vocab", "fsdp"))


def test_mesh_shape_resolution():
    assert parallel.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert parallel.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.resolve_mesh_shape({"data": 4}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.resolve_mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_rules_use_each_mesh_axis_once():
    assert parallel.logical_to_spec(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), None, None)
    assert parallel.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    # 'vocab' falls back to its second rule when 'tensor' is taken.
    assert parallel.logical_to_spec(("heads", "vocab"), RULES) == P("tensor", "fsdp")
    assert parallel.logical_to_spec((None, "unknown"), RULES) == P(None, None)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def test_create_sharded_matches_unsharded_and_rules():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = parallel.create_sharded(lambda: _Mlp(nnx.Rngs(0)), mesh, RULES)
    reference = _Mlp(nnx.Rngs(0))
    assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.down.kernel[...].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(model.up.kernel[...]), np.asarray(reference.up.kernel[...]))
    x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    batch = parallel.shard_batch({"x": x}, mesh, RULES)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, v: m(v))(model, batch["x"])),
                               np.asarray(reference(x)), rtol=1e-5, atol=1e-5)
    _, abstract = parallel.abstract_state(lambda: _Mlp(nnx.Rngs(0)), mesh, RULES)
    assert abstract["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert parallel.data_parallel_size(mesh, RULES) == 4


def test_init_jitted_equals_eager_init():
    jitted = parallel.init_jitted(lambda: _Mlp(nnx.Rngs(3)))
    eager = _Mlp(nnx.Rngs(3))
    # same random bits; the unoptimised program may round the scaling differently (1 ulp)
    np.testing.assert_allclose(np.asarray(jitted.up.kernel[...]), np.asarray(eager.up.kernel[...]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jitted.down.bias[...]), np.asarray(eager.down.bias[...]))
