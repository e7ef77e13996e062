"""GAN losses against closed forms, R1 against an analytic gradient, LeCam anchors."""
import jax
import jax.numpy as jnp
import numpy as np

from tokenizers import gan


def test_losses_match_closed_forms():
    real = jnp.array([2.0, -1.0])
    fake = jnp.array([0.5, -3.0])
    sig = jax.nn.sigmoid
    expected = -np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake)))
    np.testing.assert_allclose(gan.ns_d_loss(real, fake), expected, rtol=1e-6)
    np.testing.assert_allclose(gan.ns_g_loss(fake), -np.mean(np.log(sig(fake))), rtol=1e-6)
    np.testing.assert_allclose(gan.hinge_d_loss(real, fake), np.mean([0.0, 2.0]) + np.mean([1.5, 0.0]))
    np.testing.assert_allclose(gan.hinge_g_loss(fake), 1.25)


def test_r1_penalty_analytic():
    # D(x) = sum(w * x) per example: grad = w, so the penalty is ||w||^2.
    w = jnp.array([1.0, -2.0, 3.0])
    x = jnp.ones((4, 3))
    np.testing.assert_allclose(gan.r1_penalty(lambda v: v @ w, x), 14.0, rtol=1e-6)


def test_lecam_anchors_and_loss():
    anchors = gan.lecam_init()[...]
    anchors = gan.lecam_update(anchors, jnp.full((3,), 2.0), jnp.full((3,), -1.0), decay=0.5)
    np.testing.assert_allclose(anchors, [1.0, -0.5])
    # real logits above the fake anchor and fake logits below the real anchor are penalised
    loss = gan.lecam_loss(jnp.array([0.5]), jnp.array([0.0]), anchors)
    np.testing.assert_allclose(loss, 1.0 + 1.0)
    assert float(gan.lecam_loss(jnp.array([-1.0]), jnp.array([2.0]), anchors)) == 0.0


def test_feature_matching_zero_for_equal_features_and_grad_flows_to_fake():
    feats = [jnp.ones((2, 3)), jnp.arange(4.0)]
    assert float(gan.feature_matching_loss(feats, feats)) == 0.0
    grad = jax.grad(lambda f: gan.feature_matching_loss(feats, [f, feats[1]]))(jnp.zeros((2, 3)))
    assert np.all(np.asarray(grad) < 0)
