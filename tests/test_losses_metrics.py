"""Losses and metrics against numpy, scikit-learn and optax-free closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, hinge_loss, log_loss, r2_score

from fml import losses, metrics

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(50, 4)).astype(np.float32)
LABELS = RNG.integers(0, 4, 50).astype(np.int32)


def test_softmax_cross_entropy_matches_sklearn_log_loss():
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
    got = losses.softmax_cross_entropy(jnp.asarray(LOGITS), LABELS).mean()
    assert float(got) == pytest.approx(log_loss(LABELS, p, labels=range(4)), rel=1e-5)


def test_sigmoid_cross_entropy_matches_sklearn_log_loss():
    logit = LOGITS[:, :1]
    y = LABELS % 2
    p = 1 / (1 + np.exp(-logit[:, 0]))
    got = losses.sigmoid_cross_entropy(jnp.asarray(logit), y).mean()
    assert float(got) == pytest.approx(log_loss(y, p), rel=1e-5)


def test_binary_hinge_matches_sklearn():
    score = LOGITS[:, :1]
    y = LABELS % 2
    got = losses.hinge(jnp.asarray(score), y).mean()
    assert float(got) == pytest.approx(hinge_loss(2 * y - 1, score[:, 0]), rel=1e-5)


def test_one_vs_rest_hinge_and_squared_hinge_match_numpy():
    signs = 2 * np.eye(4)[LABELS] - 1
    margins = np.maximum(0, 1 - signs * LOGITS)
    np.testing.assert_allclose(losses.hinge(jnp.asarray(LOGITS), LABELS), margins.sum(1), rtol=1e-5)
    np.testing.assert_allclose(
        losses.squared_hinge(jnp.asarray(LOGITS), LABELS), (margins**2).sum(1), rtol=1e-5
    )


def test_mse_accepts_flat_targets_for_one_output():
    pred = LOGITS[:, :1]
    y = LOGITS[:, 1]
    np.testing.assert_allclose(losses.mse(jnp.asarray(pred), y), (pred[:, 0] - y) ** 2, rtol=1e-6)
    np.testing.assert_allclose(
        losses.mse(jnp.asarray(LOGITS), LOGITS[::-1]),
        ((LOGITS - LOGITS[::-1]) ** 2).mean(1),
        rtol=1e-6,
    )


def test_l2_penalty_skips_biases():
    params = {"dense": {"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 100.0)}}
    assert float(losses.l2_penalty(params)) == pytest.approx(0.5 * 6 * 4.0)


def test_accuracy_and_r2_match_sklearn():
    assert float(metrics.accuracy(jnp.asarray(LOGITS), LABELS)) == pytest.approx(
        accuracy_score(LABELS, LOGITS.argmax(1))
    )
    score = LOGITS[:, :1]
    assert float(metrics.accuracy(jnp.asarray(score), LABELS % 2)) == pytest.approx(
        accuracy_score(LABELS % 2, score[:, 0] > 0)
    )
    y = LOGITS[:, :2] + 0.3 * LOGITS[:, 2:]
    assert float(metrics.r2(jnp.asarray(LOGITS[:, :2]), y)) == pytest.approx(
        r2_score(y, LOGITS[:, :2]), rel=1e-5
    )
