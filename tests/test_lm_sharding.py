"""Sharded LM on 8 fake CPU devices: parameter layouts from the rules, same loss and gradients."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from videolm import configlib, parallel
from videolm.train import compute_loss, setup, state_constructor

OVERRIDES = ("data.dataset=synthetic", "model.width=32", "model.depth=2", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=64",
             "model.attention_impl=xla", "vocab.video_tokenizer_config=", "vocab.audio_tokenizer_config=",
             "vocab.text_size=8", "vocab.video_bits=4", "vocab.audio_levels=2",
             "vocab.audio_codes=8")


def _config(mesh):
    config = configlib.load_config("configs/lm.py:tiny", OVERRIDES)
    config.mesh = mesh
    return config


def _loss_and_grads(config, batch, devices, params=None):
    """Loss and gradients on a mesh over ``devices``; parameters created sharded unless given."""
    mesh, rules, layout, graphdef, abstract = setup(config, devices=devices)
    with parallel.use_mesh(mesh, rules):
        if params is None:
            model = parallel.create_sharded(state_constructor(config, layout), mesh, rules).model
            graphdef, params = nnx.split(model)
        else:
            graphdef, abstract_params = nnx.split(nnx.merge(graphdef, abstract).model)
            params = jax.device_put(jax.device_get(params), jax.tree.map(lambda a: a.sharding, abstract_params))

        @jax.jit
        def loss_and_grads(params, batch):
            loss_fn = functools.partial(compute_loss, layout=layout, z_loss=1e-4, chunk_size=0)
            (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(nnx.merge(graphdef, params), batch)
            return loss, grads
        loss, grads = loss_and_grads(params, parallel.shard_batch(batch, mesh, rules))
    return params, loss, grads


@pytest.fixture(scope="module")
def runs(num_fake_devices):
    assert num_fake_devices == 8
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 296, (8, 17)).astype(np.int32),
             "prefix_len": np.array([0, 3, 5, 16, 1, 8, 9, 2], np.int32)}
    eight = _loss_and_grads(_config(dict(data=2, fsdp=2, tensor=2)), batch, jax.devices())
    one = _loss_and_grads(_config(dict(data=1, fsdp=1, tensor=1)), batch, jax.devices()[:1], params=eight[0])
    return one, eight


def test_parameter_shardings_follow_the_rules(runs):
    _, (params, _, grads) = runs
    specs = {jax.tree_util.keystr(path): leaf.sharding.spec
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    expected = {
        "['embedding']": P("tensor", "fsdp"),
        "['head']": P("fsdp", "tensor"),
        "['blocks']['wq']": P(None, "fsdp", "tensor", None),
        "['blocks']['wk']": P(None, "fsdp", "tensor", None),
        "['blocks']['wo']": P(None, "tensor", None, "fsdp"),
        "['blocks']['wi']": P(None, "fsdp", None, "tensor"),
        "['blocks']['wo_mlp']": P(None, "tensor", "fsdp"),
        "['blocks']['attn_norm']['scale']": P(None, None),
        "['final_norm']['scale']": P(None),
    }
    for key, spec in expected.items():
        found = [s for k, s in specs.items() if k.startswith(key)]
        assert found, f"no parameter {key}"
        assert all(tuple(s) + (None,) * (len(spec) - len(s)) == tuple(spec) for s in found), (key, found, spec)


def test_eight_devices_match_one(runs):
    (params1, loss1, grads1), (params8, loss8, grads8) = runs
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params1))
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("size", ["300m", "1b", "8b"])
def test_paper_sizes_shard_over_fsdp_and_tensor(size):
    """Abstract (no memory) model + optimizer state of each paper size on 8 devices: every leaf divides."""
    config = configlib.load_config(f"configs/lm.py:{size}")
    config.mesh = dict(data=1, fsdp=2, tensor=4)
    config.data.dataset = "synthetic"  # the paper's vocabulary from config.vocab, no token shards
    _, _, _, _, abstract = setup(config)
    leaves = jax.tree.leaves(abstract)
    for leaf in leaves:
        leaf.sharding.shard_shape(leaf.shape)  # raises if a sharded dimension does not divide
    sharded = sum(leaf.size for leaf in leaves if not leaf.sharding.is_fully_replicated)
    assert sharded / sum(leaf.size for leaf in leaves) > 0.99
