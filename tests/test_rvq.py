"""Residual VQ: k-means init, EMA update by hand, dead-code restarts, dropout, LM id layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers.soundstream import rvq
from videolm import parallel

LEVELS, CODES, DIM = 3, 8, 4


def _quantizer(**kwargs):
    return rvq.ResidualVQ(LEVELS, CODES, DIM, rngs=nnx.Rngs(0), **kwargs)


def _clustered(n=512, seed=0):
    """Latents [1, n, DIM]: CODES well-separated centres, small noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CODES, DIM)) * 4.0
    labels = rng.integers(0, CODES, n)
    x = centres[labels] + 0.1 * rng.normal(size=(n, DIM))
    return jnp.asarray(x[None], jnp.float32), centres


def test_kmeans_init_finds_the_clusters_and_runs_once():
    q = _quantizer()
    latents, centres = _clustered()
    q.initialize(latents, jax.random.key(1))
    book = np.asarray(q.codebooks[...][0])
    # Every true centre has a level-0 code within the noise scale.
    nearest = np.min(np.linalg.norm(centres[:, None] - book[None], axis=-1), axis=1)
    assert nearest.max() < 0.1
    assert int(q.initialized[...]) == 1
    counts = np.asarray(q.ema_count[...])
    assert counts[0].sum() == latents.shape[1]
    # A second call (a later step) leaves the codebooks alone.
    before = np.asarray(q.codebooks[...])
    q.initialize(latents * 3.0 + 1.0, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(q.codebooks[...]), before)


def test_residuals_shrink_level_by_level():
    q = _quantizer()
    latents = jax.random.normal(jax.random.key(0), (4, 64, DIM))
    q.initialize(latents, jax.random.key(1))
    out = q(latents)
    power = [float(jnp.mean(jnp.square(r))) for r in out.residuals]
    final = float(jnp.mean(jnp.square(latents - q.decode(out.codes))))
    assert power[0] > power[1] > power[2] > final


def test_ema_update_matches_a_hand_computation():
    decay, eps = 0.9, 1e-5
    q = _quantizer(decay=decay, dead_code_threshold=0.0, epsilon=eps)
    rng = np.random.default_rng(3)
    residuals = rng.normal(size=(LEVELS, 2, 5, DIM)).astype(np.float32)
    codes = rng.integers(0, CODES, (2, 5, LEVELS)).astype(np.int32)
    count0 = np.asarray(q.ema_count[...]).copy()
    sum0 = np.asarray(q.ema_sum[...]).copy()
    q.update(jnp.asarray(residuals), jnp.asarray(codes), jax.random.key(0))
    for level in range(LEVELS):
        flat_r = residuals[level].reshape(-1, DIM)
        flat_c = codes[..., level].reshape(-1)
        counts = np.zeros(CODES)
        sums = np.zeros((CODES, DIM))
        for c, r in zip(flat_c, flat_r):
            counts[c] += 1
            sums[c] += r
        ema_count = decay * count0[level] + (1 - decay) * counts
        ema_sum = decay * sum0[level] + (1 - decay) * sums
        n = ema_count.sum()
        smoothed = (ema_count + eps) / (n + CODES * eps) * n
        np.testing.assert_allclose(np.asarray(q.ema_count[...][level]), ema_count, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(q.ema_sum[...][level]), ema_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(q.codebooks[...][level]), ema_sum / smoothed[:, None],
                                   rtol=1e-4, atol=1e-5)


def test_dead_codes_are_restarted_from_the_batch():
    threshold = 1.0
    q = _quantizer(decay=0.5, dead_code_threshold=threshold)
    q.ema_count[...] = jnp.full((LEVELS, CODES), 10.0)
    residuals = jax.random.normal(jax.random.key(0), (LEVELS, 1, 16, DIM)) + 100.0
    codes = jnp.zeros((1, 16, LEVELS), jnp.int32)            # only code 0 is used
    stats = q.update(residuals, codes, jax.random.key(1))
    # Unused codes decay to 5 (alive); code 0 gets 0.5 * 10 + 0.5 * 16 = 13.
    np.testing.assert_array_equal(np.asarray(stats["restarted"]), np.zeros(LEVELS))
    stats = q.update(residuals, codes, jax.random.key(2))     # unused: 2.5, still >= 1
    stats = q.update(residuals, codes, jax.random.key(3))     # unused: 1.25
    stats = q.update(residuals, codes, jax.random.key(4))     # unused: 0.625 < 1 -> restarted
    np.testing.assert_array_equal(np.asarray(stats["restarted"]), np.full(LEVELS, CODES - 1))
    books = np.asarray(q.codebooks[...])
    batch = np.asarray(residuals).reshape(LEVELS, -1, DIM)
    for level in range(LEVELS):
        for code in range(1, CODES):      # each restarted code is one of that level's batch vectors
            assert np.min(np.abs(batch[level] - books[level, code]).max(-1)) < 1e-5
    np.testing.assert_allclose(np.asarray(q.ema_count[...])[:, 1:], threshold)
    assert np.all(np.asarray(q.ema_count[...])[:, 0] > threshold)


def test_quantizer_dropout_keeps_only_the_first_levels():
    q = _quantizer()
    latents = jax.random.normal(jax.random.key(0), (3, 10, DIM))
    q.initialize(latents, jax.random.key(1))
    out = q(latents, active_levels=jnp.array([1, 2, 3]))
    books = q.codebooks[...]
    for b, n in enumerate((1, 2, 3)):
        expected = sum(books[level][out.codes[b, :, level]] for level in range(n))
        np.testing.assert_allclose(np.asarray(out.quantized[b]), np.asarray(expected), atol=1e-5)
        np.testing.assert_allclose(np.asarray(q.decode(out.codes[b:b + 1, :, :n])[0]), np.asarray(expected),
                                   atol=1e-5)
    # Inference encoding gives the same codes as the training forward.
    np.testing.assert_array_equal(np.asarray(q.encode(latents)), np.asarray(out.codes))
    np.testing.assert_array_equal(np.asarray(q.encode(latents, 2)), np.asarray(out.codes[..., :2]))


def test_straight_through_gradient_is_identity():
    q = _quantizer()
    latents = jax.random.normal(jax.random.key(0), (2, 5, DIM))
    q.initialize(latents, jax.random.key(1))
    weights = jax.random.normal(jax.random.key(2), latents.shape)
    grad = jax.grad(lambda z: jnp.sum(q(z).quantized * weights))(latents)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(weights), rtol=1e-6)


def test_bad_levels_and_dims_raise():
    q = _quantizer()
    with pytest.raises(ValueError, match="number of levels"):
        q.encode(jnp.zeros((1, 2, DIM)), LEVELS + 1)
    with pytest.raises(ValueError, match="dim"):
        q(jnp.zeros((1, 2, DIM + 1)))
    with pytest.raises(ValueError, match="decay"):
        rvq.ResidualVQ(2, 4, 2, decay=1.0, rngs=nnx.Rngs(0))


def test_flatten_unflatten_round_trip_with_disjoint_level_ranges():
    k, levels, frames = 1024, 4, 106
    codes = np.random.default_rng(0).integers(0, k, (2, levels, frames))
    ids = rvq.flatten_codes(codes, k)
    assert ids.shape == (2, levels * frames)
    for level in range(levels):      # level by level: all level-l frames, in order, in [l*k, (l+1)*k)
        block = ids[:, level * frames:(level + 1) * frames]
        np.testing.assert_array_equal(block, codes[:, level] + level * k)
        assert block.min() >= level * k and block.max() < (level + 1) * k
    np.testing.assert_array_equal(rvq.unflatten_codes(ids, levels, k), codes)
    np.testing.assert_array_equal(np.asarray(rvq.unflatten_codes(jnp.asarray(ids), levels, k)), codes)
    with pytest.raises(ValueError, match="outside"):
        rvq.unflatten_codes(ids[..., ::-1], levels, k)
    with pytest.raises(ValueError, match="multiple"):
        rvq.unflatten_codes(ids[..., :-1], levels, k)


def test_sharded_update_matches_single_device(num_fake_devices):
    """EMA statistics are reductions over the global batch: a data-parallel update equals one device's."""
    mesh = parallel.make_mesh({"data": -1})
    rules = (("batch", "data"),)
    q = _quantizer(dead_code_threshold=0.0)
    graphdef, state = nnx.split(q)
    residuals = jax.random.normal(jax.random.key(0), (LEVELS, num_fake_devices, 6, DIM))
    codes = jax.random.randint(jax.random.key(1), (num_fake_devices, 6, LEVELS), 0, CODES)

    def step(state, residuals, codes):
        model = nnx.merge(graphdef, state)
        model.update(residuals, codes, jax.random.key(2))
        return nnx.state(model)

    single = jax.jit(step)(state, residuals, codes)
    sharded_r = jax.device_put(residuals, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
    sharded_c = parallel.shard_batch({"c": np.asarray(codes)}, mesh, rules)["c"]
    assert len(sharded_r.sharding.device_set) == num_fake_devices
    sharded = jax.jit(step)(state, sharded_r, sharded_c)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
