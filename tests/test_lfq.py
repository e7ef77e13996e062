"""Lookup-free quantization: index round trips, straight-through gradients, entropy loss values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers.magvit import lfq


def test_index_round_trip_every_code():
    bits = 10
    indices = jnp.arange(2 ** bits)
    codes = lfq.indices_to_codes(indices, bits)
    assert codes.shape == (2 ** bits, bits)
    assert set(np.unique(np.asarray(codes))) == {-1.0, 1.0}
    np.testing.assert_array_equal(lfq.codes_to_indices(codes), indices)
    # Bit i of the index is channel i (little-endian): index 5 = channels 0 and 2 positive.
    np.testing.assert_array_equal(lfq.indices_to_codes(jnp.array(5), 4), [1.0, -1.0, 1.0, -1.0])


def test_quantize_signs_and_indices():
    z = jax.random.normal(jax.random.key(0), (3, 4, 5, 12))
    zq, idx = lfq.quantize(z)
    np.testing.assert_array_equal(zq, np.where(np.asarray(z) > 0, 1.0, -1.0))
    assert idx.dtype == jnp.int32 and idx.shape == (3, 4, 5)
    np.testing.assert_array_equal(lfq.indices_to_codes(idx, 12), zq)
    # Eighteen bits (VideoPoet's 2^18 vocabulary) still fit int32 indices.
    z18 = jax.random.normal(jax.random.key(1), (100, 18))
    idx18 = lfq.quantize(z18)[1]
    np.testing.assert_array_equal(lfq.indices_to_codes(idx18, 18), jnp.sign(z18))


def test_straight_through_gradient_is_identity():
    z = jax.random.normal(jax.random.key(2), (6, 8))
    w = jax.random.normal(jax.random.key(3), (6, 8))
    grad = jax.grad(lambda z: jnp.sum(w * lfq.quantize(z)[0]))(z)
    np.testing.assert_allclose(grad, w, rtol=0, atol=0)


def test_commitment_loss_value_and_gradient():
    z = jnp.array([[0.5, -2.0], [1.0, -0.25]])
    expected = np.mean([(0.5 - 1) ** 2, (-2 + 1) ** 2, 0.0, (-0.25 + 1) ** 2])
    np.testing.assert_allclose(lfq.commitment_loss(z), expected, rtol=1e-6)
    grad = jax.grad(lfq.commitment_loss)(z)
    np.testing.assert_allclose(grad, 2 * (z - jnp.sign(z)) / z.size, rtol=1e-6)


def _all_codes(bits, repeats=1, scale=3.0):
    return jnp.tile(lfq.indices_to_codes(jnp.arange(2 ** bits), bits) * scale, (repeats, 1))


def test_entropy_uniform_versus_collapsed():
    bits = 6
    uniform = _all_codes(bits, repeats=2)                       # every code equally often
    collapsed = jnp.tile(_all_codes(bits)[:1], (2 ** bits * 2, 1))  # one code everywhere
    per_u, code_u = lfq.group_entropies(uniform, temperature=0.01, bits_per_group=bits)
    per_c, code_c = lfq.group_entropies(collapsed, temperature=0.01, bits_per_group=bits)
    np.testing.assert_allclose(code_u, bits * math.log(2), rtol=1e-5)   # maximal: log 2^bits
    np.testing.assert_allclose(code_c, 0.0, atol=1e-5)
    np.testing.assert_allclose(per_u, 0.0, atol=1e-5)                    # confident assignments
    np.testing.assert_allclose(per_c, 0.0, atol=1e-5)
    loss_u = lfq.entropy_loss(uniform)[0]
    loss_c = lfq.entropy_loss(collapsed)[0]
    assert loss_u < loss_c - 4.0


def test_entropy_subgroups_sum_and_factorised_per_sample_term():
    z = jax.random.normal(jax.random.key(4), (256, 8)) * 0.05
    t = 0.1
    per_full, code_full = lfq.group_entropies(z, temperature=t, bits_per_group=8)
    per_grp, code_grp = lfq.group_entropies(z, temperature=t, bits_per_group=3)   # groups 3, 3, 2
    assert lfq.bit_groups(8, 3) == [3, 3, 2]
    # The per-sample entropy factorises over bits: exactly the same with any grouping, and equal
    # to the sum of the binary entropies of p(bit = +1 | z) = sigmoid(4 z / t).
    np.testing.assert_allclose(per_grp, per_full, rtol=1e-5)
    p = jax.nn.sigmoid(4 * z / t)
    binary = -(p * jnp.log(p) + (1 - p) * jnp.log(1 - p))
    np.testing.assert_allclose(per_full, jnp.mean(jnp.sum(binary, -1)), rtol=1e-5)
    # Sum of marginal entropies bounds the joint one from above.
    assert float(code_grp) >= float(code_full) - 1e-5
    # Independent uniform bits: the bound is tight.
    uniform = _all_codes(6)
    np.testing.assert_allclose(lfq.group_entropies(uniform, temperature=0.01, bits_per_group=2)[1],
                               6 * math.log(2), rtol=1e-5)


def test_entropy_is_f32_and_finite_for_half_precision_and_large_logits():
    z = (jax.random.normal(jax.random.key(5), (512, 18)) * 4).astype(jnp.bfloat16)
    loss, parts = lfq.entropy_loss(z, temperature=0.01, bits_per_group=9)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    grad = jax.grad(lambda z: lfq.entropy_loss(z, temperature=0.01)[0])(z.astype(jnp.float32))
    assert np.isfinite(np.asarray(grad)).all()
    # One-hot soft assignments (saturated logits) give exact zeros, not NaN.
    assert np.isfinite(float(parts["per_sample_entropy"]))


def test_entropy_loss_gradient_spreads_a_collapsed_batch():
    z = jnp.tile(jnp.array([[0.3, 0.2, -0.1, 0.4]]), (64, 1))
    z = z + 0.01 * jax.random.normal(jax.random.key(6), z.shape)
    loss_fn = lambda z: lfq.entropy_loss(z, temperature=0.5, bits_per_group=4)[0]
    step = z - 0.5 * jax.grad(loss_fn)(z) * z.shape[0]
    assert float(loss_fn(step)) < float(loss_fn(z))


def test_entropy_weight_anneals_three_to_one():
    w = lambda s: float(lfq.entropy_weight_at(s, base_weight=0.1, start_multiplier=3.0, anneal_steps=2000))
    np.testing.assert_allclose([w(0), w(1000), w(2000), w(5000)], [0.3, 0.2, 0.1, 0.1], rtol=1e-6)


def test_codebook_usage_statistics():
    stats = lfq.codebook_usage(np.array([5, 5, 0, 0]))
    assert stats["codebook_usage"] == 0.5
    np.testing.assert_allclose(stats["perplexity"], 2.0)
    np.testing.assert_allclose(stats["token_entropy_bits"], 1.0)
    with pytest.raises(ValueError, match="empty"):
        lfq.codebook_usage(np.zeros(4))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        lfq.indices_to_codes(jnp.arange(4), 31)
    with pytest.raises(ValueError, match="integers"):
        lfq.indices_to_codes(jnp.ones(3), 4)
    with pytest.raises(ValueError, match="temperature"):
        lfq.group_entropies(jnp.ones((2, 4)), temperature=0.0, bits_per_group=2)
    with pytest.raises(ValueError, match="bits_per_group"):
        lfq.bit_groups(8, 0)
