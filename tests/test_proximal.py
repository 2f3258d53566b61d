"""L1 and elastic net (`fml.proximal`, `fit(l1=...)`) against scikit-learn's
Lasso, ElasticNet and saga L1 logistic regression, and the soft-threshold
against its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import ElasticNet, Lasso, LogisticRegression

import fml
from fml import proximal
from fml.errors import ConfigError


def _lasso_objective(x, y, w, b, alpha, l2=0.0):
    """scikit-learn's Lasso / ElasticNet objective (`l2` is alpha * (1 - l1_ratio))."""
    return 0.5 * np.mean((x @ w + b - y) ** 2) + alpha * np.abs(w).sum() + 0.5 * l2 * np.sum(w**2)


def _coefficients(state):
    dense = state.params["dense"]
    return np.asarray(dense["w"], np.float64)[:, 0], float(dense["b"][0])


def test_soft_threshold_is_the_l1_proximal_map():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    out = proximal.soft_threshold({"w": jnp.asarray(w), "b": jnp.asarray(b)}, 0.5)
    expected = np.sign(w) * np.maximum(np.abs(w) - 0.5, 0.0)
    np.testing.assert_allclose(out["w"], expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(out["b"], b)  # biases are not penalised
    assert int((np.asarray(out["w"]) == 0).sum()) == int((np.abs(w) <= 0.5).sum())


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_lasso_reaches_sklearn(alpha):
    d = fml.data.load("diabetes")
    x, y = d.x_train.astype(np.float64), d.y_train.astype(np.float64)
    reference = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(x, y)
    # fml's mse is the mean of squares (sklearn's has a half): l1 = 2 alpha.
    state, _ = fml.fit(
        fml.models.linear_regression(),
        d,
        optimizer="fista",
        l1=2 * alpha,
        epochs=300,
        fused=True,
        quiet=True,
    )
    w, b = _coefficients(state)
    np.testing.assert_array_equal(w == 0, reference.coef_ == 0)
    assert (reference.coef_ == 0).any()
    ours = _lasso_objective(x, y, w, b, alpha)
    theirs = _lasso_objective(x, y, reference.coef_, reference.intercept_, alpha)
    assert abs(ours - theirs) <= 1e-4 * theirs
    np.testing.assert_allclose(w, reference.coef_, atol=1e-3 * np.abs(reference.coef_).max())


def test_elastic_net_reaches_sklearn():
    d = fml.data.load("diabetes")
    x, y = d.x_train.astype(np.float64), d.y_train.astype(np.float64)
    alpha, ratio = 2.0, 0.7
    reference = ElasticNet(alpha=alpha, l1_ratio=ratio, tol=1e-12, max_iter=100_000).fit(x, y)
    state, _ = fml.fit(
        fml.models.linear_regression(),
        d,
        optimizer="fista",
        l1=2 * alpha * ratio,
        l2=2 * alpha * (1 - ratio),
        epochs=300,
        fused=True,
        quiet=True,
    )
    w, b = _coefficients(state)
    np.testing.assert_array_equal(w == 0, reference.coef_ == 0)
    l2 = alpha * (1 - ratio)
    ours = _lasso_objective(x, y, w, b, alpha * ratio, l2)
    theirs = _lasso_objective(x, y, reference.coef_, reference.intercept_, alpha * ratio, l2)
    assert abs(ours - theirs) <= 1e-4 * theirs


def test_l1_logistic_regression_reaches_saga():
    d = fml.data.load("breast_cancer")
    x, y = d.x_train.astype(np.float64), d.y_train
    n, C = len(x), 0.1
    reference = LogisticRegression(l1_ratio=1.0, solver="saga", C=C, tol=1e-10, max_iter=100_000)
    reference.fit(x, y)
    state, _ = fml.fit(
        fml.models.logistic_regression(2),
        d,
        optimizer="fista",
        l1=1 / (C * n),
        epochs=300,
        fused=True,
        quiet=True,
    )
    w, b = _coefficients(state)

    def objective(w, b):
        z = x @ w + b
        return np.mean(np.logaddexp(0, z) - y * z) + np.abs(w).sum() / (C * n)

    np.testing.assert_array_equal(w == 0, reference.coef_[0] == 0)
    assert (reference.coef_ == 0).mean() > 0.5
    theirs = objective(reference.coef_[0], reference.intercept_[0])
    assert abs(objective(w, b) - theirs) <= 1e-4 * theirs


def test_proximal_sgd_is_ista():
    """`proximal_l1(sgd)` on the full batch is ISTA: it reaches the Lasso optimum."""
    d = fml.data.load("diabetes")
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    alpha = 5.0
    reference = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(d.x_train, d.y_train)
    tx = proximal.proximal_l1(optax.sgd(0.3), alpha)

    def smooth(params):
        return 0.5 * jnp.mean(jnp.square(x @ params["w"][:, 0] + params["b"][0] - y))

    def body(_, carry):
        params, state = carry
        updates, state = tx.update(jax.grad(smooth)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.zeros((x.shape[1], 1)), "b": jnp.zeros(1)}
    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 20_000, body, (p, tx.init(p))))(params)
    w = np.asarray(params["w"][:, 0])
    np.testing.assert_array_equal(w == 0, reference.coef_ == 0)
    np.testing.assert_allclose(w, reference.coef_, atol=2e-3 * np.abs(reference.coef_).max())


def test_mlp_with_l1_has_exact_zeros():
    d = fml.data.load("digits")
    model = fml.models.mlp([32, 10])
    kwargs = dict(optimizer="adam", learning_rate=1e-2, epochs=3, batch_size=128, quiet=True)
    dense, _ = fml.fit(model, d, **kwargs)
    sparse, history = fml.fit(model, d, l1=1e-3, **kwargs)
    zeros = float(np.mean(np.asarray(sparse.params["dense_0"]["w"]) == 0))
    assert float(np.mean(np.asarray(dense.params["dense_0"]["w"]) == 0)) == 0.0
    assert zeros > 0.3
    assert history["test"]["accuracy"] > 0.8


def test_l1_needs_a_proximal_optimizer():
    with pytest.raises(ConfigError, match="lbfgs"):
        fml.fit(
            fml.models.linear_regression(),
            fml.data.load("diabetes"),
            optimizer="lbfgs",
            l1=1.0,
            epochs=1,
            quiet=True,
        )
    with pytest.raises(ConfigError, match="l1"):
        fml.fit(
            fml.models.linear_regression(),
            fml.data.load("diabetes"),
            optimizer="fista",
            l1=-1.0,
            epochs=1,
            quiet=True,
        )
