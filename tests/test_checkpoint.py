"""Checkpointer: state + grain iterator + metadata round trip, resharding, NaN refusal."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from videolm import checkpoint, parallel


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


def test_round_trip_with_iterator_and_metadata(tmp_path):
    state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.array(7, jnp.int32)}
    it = _iterator()
    next(it), next(it)
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(7, state, data_iterator=it, metadata={"note": "x"})
        expected = [next(it) for _ in range(3)]
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 7
        fresh = _iterator()
        restored, meta = ckpt.restore(checkpoint.abstract_like(state), data_iterator=fresh)
        assert meta == {"note": "x", "step": 7}
        np.testing.assert_array_equal(restored["w"], state["w"])
        for batch in expected:
            np.testing.assert_array_equal(next(fresh), batch)


def test_restore_onto_another_mesh_and_refuse_nan(tmp_path):
    mesh = parallel.make_mesh({"data": 8})
    state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("data")))}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state)
        other = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        target = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=NamedSharding(other, P("fsdp", "tensor")))}
        restored, _ = ckpt.restore(target)
        assert restored["w"].sharding.spec == P("fsdp", "tensor")
        np.testing.assert_array_equal(restored["w"], state["w"])
        with pytest.raises(FloatingPointError, match="step 2"):
            ckpt.save(2, {"w": jnp.array([1.0, jnp.nan])})
        assert ckpt.all_steps() == [1]
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.Checkpointer(str(tmp_path / "empty")).restore(target)
