"""FLOP counting (videolm.benchmark.count_flops) on programs whose count is known by hand."""
import jax
import jax.numpy as jnp
import pytest

from videolm import benchmark


def _conv(x, k, strides=(1, 1)):
    return jax.lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


X = jnp.ones((2, 8, 8, 4))
K = jnp.ones((3, 3, 4, 5))
CONV_FLOPS = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)      # 2 x outputs x taps x input channels


def test_matmul_and_conv():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert benchmark.count_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 4
    assert benchmark.count_flops(_conv, X, K) == CONV_FLOPS
    assert benchmark.count_flops(lambda x, k: _conv(x, k, (2, 2)), X, K) == CONV_FLOPS / 4


def test_grouped_conv_counts_per_group_inputs():
    k = jnp.ones((3, 3, 2, 4))   # 2 groups of 2 input channels
    fn = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert benchmark.count_flops(fn, X, k) == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 2)


def test_nested_programs():
    inner = jax.jit(_conv)
    assert benchmark.count_flops(lambda x, k: inner(x, k) + inner(x, k), X, K) == 2 * CONV_FLOPS
    assert benchmark.count_flops(jax.checkpoint(_conv), X, K) == CONV_FLOPS

    def scanned(x, k):
        return jax.lax.scan(lambda c, _: (c, _conv(c, k)), x, None, length=3)[1]
    assert benchmark.count_flops(scanned, X, K) == 3 * CONV_FLOPS

    def branches(p, x, k):   # the costliest branch counts
        return jax.lax.cond(p, lambda: _conv(x, k), lambda: jnp.zeros((2, 8, 8, 5)))
    assert benchmark.count_flops(branches, True, X, K) == CONV_FLOPS


def test_gradient_of_strided_conv_counts_no_inserted_zeros():
    # The input gradient of a stride-2 conv is an input-dilated conv: counted without its zeros,
    # each of the two backward convs costs what the forward does.
    loss = lambda x, k: jnp.sum(_conv(x, k, (2, 2)))
    forward = CONV_FLOPS / 4
    assert benchmark.count_flops(jax.grad(loss, argnums=(0, 1)), X, K) == pytest.approx(3 * forward, rel=0.1)
