"""Training: one compile per run, fused epochs equal per-step epochs, masks are exact,
and real data sets reach real numbers against numpy and scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fml
from fml import models, train
from fml.models import presets


def _toy_classification(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, k))).argmax(-1).astype(np.int32)
    return x, y


def _step_fn(model, loss=None, optimizer="adam", lr=1e-2, input_shape=(5,)):
    tx = train.make_optimizer(optimizer, lr)
    objective = train.make_objective(model, loss)
    state = train.init_state(model, tx, input_shape, seed=0)
    return jax.jit(train.make_train_step(model, objective, tx), donate_argnums=0), state


def test_second_step_does_not_recompile():
    model = models.mlp([8, 3], dropout=0.1)
    step, state = _step_fn(model)
    x, y = _toy_classification()
    batch = {"x": x[:16], "y": y[:16], "mask": np.ones(16, np.float32)}
    state, _ = step(state, batch)
    batch2 = {"x": x[16:32], "y": y[16:32], "mask": np.ones(16, np.float32)}
    state, _ = step(state, batch2)
    state, _ = step(state, batch2)
    assert step._cache_size() == 1
    assert int(state.step) == 3


def test_learning_rate_is_state_not_a_constant():
    """A new learning rate is a new value in opt_state, not a new program."""
    model = models.logistic_regression(3)
    step, state = _step_fn(model)
    x, y = _toy_classification()
    batch = {"x": x, "y": y, "mask": np.ones(len(x), np.float32)}
    state, _ = step(state, batch)
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = jnp.full_like(hyper["learning_rate"], 0.5)
    before = np.array(state.params["dense"]["b"])  # the step donates (deletes) its input
    state = state._replace(opt_state=state.opt_state._replace(hyperparams=hyper))
    state, _ = step(state, batch)
    assert step._cache_size() == 1
    # Adam's first steps move each parameter by about the learning rate.
    assert float(jnp.abs(state.params["dense"]["b"] - before).max()) > 0.1


def test_step_matches_hand_written_sgd_on_numpy_gradient():
    """One SGD step of logistic regression equals the closed-form gradient in numpy."""
    model = models.logistic_regression(3)
    step, state = _step_fn(model, optimizer="sgd", lr=0.1)
    x, y = _toy_classification(n=10)
    w, b = (np.array(state.params["dense"][k], np.float64) for k in ("w", "b"))
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(3)[y]) / len(x)
    new_state, metrics = step(state, {"x": x, "y": y, "mask": np.ones(10, np.float32)})
    np.testing.assert_allclose(new_state.params["dense"]["w"], w - 0.1 * x.T @ delta, atol=1e-6)
    np.testing.assert_allclose(new_state.params["dense"]["b"], b - 0.1 * delta.sum(0), atol=1e-6)
    want_loss = -np.mean(np.log(p[np.arange(10), y]))
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)


def test_padding_mask_gives_exactly_the_unpadded_update():
    model = models.mlp([6, 3])
    x, y = _toy_classification(n=12)
    step, state = _step_fn(model, optimizer="sgd", lr=0.5)
    small, _ = step(state, {"x": x[:9], "y": y[:9], "mask": np.ones(9, np.float32)})
    step2, state2 = _step_fn(model, optimizer="sgd", lr=0.5)
    junk = np.concatenate([x[:9], 1e3 * np.ones((3, 5), np.float32)])
    padded, _ = step2(
        state2, {"x": junk, "y": y[:12], "mask": np.r_[np.ones(9), np.zeros(3)].astype(np.float32)}
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), small.params, padded.params
    )


def test_epoch_indices_cover_each_example_once():
    index, mask = train.epoch_indices(jax.random.key(3), 10, 4)
    assert index.shape == (3, 4)
    real = np.asarray(index)[np.asarray(mask) > 0]
    assert sorted(real.tolist()) == list(range(10))
    index, mask = train.epoch_indices(jax.random.key(3), 10, 4, drop_remainder=True)
    assert index.shape == (2, 4) and float(mask.min()) == 1.0


@pytest.mark.parametrize("family", ["mlp", "rnn"])
def test_fused_epoch_equals_per_step_epochs(family):
    data = fml.data.load("iris")
    x, y = data.x_train, data.y_train
    if family == "rnn":
        model, x = models.rnn("gru", 8, num_classes=3), x[..., None]
    else:
        model = models.mlp([16, 3], dropout=0.2)
    kwargs = dict(epochs=3, batch_size=16, learning_rate=1e-2, quiet=True, seed=4)
    per_step, h1 = fml.fit(model, (x, y), **kwargs)
    fused, h2 = fml.fit(model, (x, y), fused=True, **kwargs)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), per_step.params, fused.params
    )
    np.testing.assert_allclose(h1["train_loss"], h2["train_loss"], rtol=1e-5)


def test_lbfgs_reaches_sklearn_logistic_regression_optimum():
    from sklearn.linear_model import LogisticRegression

    data = fml.data.load("breast_cancer")
    n = len(data.x_train)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(
        data.x_train, data.y_train
    )
    model = models.logistic_regression(2)
    state, _ = fml.fit(
        model, data, optimizer="lbfgs", epochs=200, l2=1.0 / n, quiet=True, fused=True
    )
    np.testing.assert_allclose(state.params["dense"]["w"][:, 0], reference.coef_[0], atol=2e-3)
    np.testing.assert_allclose(state.params["dense"]["b"], reference.intercept_, atol=2e-3)


def test_closed_form_diabetes_equals_numpy_lstsq():
    data = fml.data.load("diabetes")
    model = models.linear_regression()
    params = models.least_squares(model, data.x_train, data.y_train)
    design = np.c_[data.x_train.astype(np.float64), np.ones(len(data.x_train))]
    coef = np.linalg.lstsq(design, data.y_train.astype(np.float64), rcond=None)[0]
    pred = np.c_[data.x_test, np.ones(len(data.x_test))] @ coef
    y = data.y_test.astype(np.float64)
    want_r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    got = fml.evaluate(model, params, data.x_test, data.y_test, task="regression")
    assert abs(got["r2"] - want_r2) < 1e-6


def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    data = fml.data.load("diabetes")
    model = models.linear_regression()
    params = models.least_squares(model, data.x_train, data.y_train, l2=3.0)
    reference = Ridge(alpha=3.0).fit(data.x_train, data.y_train)
    np.testing.assert_allclose(params["dense"]["w"][:, 0], reference.coef_, rtol=1e-4, atol=1e-3)


def test_logistic_regression_breast_cancer_accuracy():
    data = fml.data.load("breast_cancer")
    _, history = fml.fit(
        models.logistic_regression(2), data, epochs=30, learning_rate=1e-2, quiet=True, fused=True
    )
    assert history["test"]["accuracy"] >= 0.95


def test_svm_matches_linear_svc_accuracy():
    from sklearn.svm import LinearSVC

    data = fml.data.load("breast_cancer")
    reference = LinearSVC(C=1.0).fit(data.x_train, data.y_train).score(data.x_test, data.y_test)
    _, history = fml.fit(models.svm(2), data, epochs=60, learning_rate=1e-2, quiet=True, fused=True)
    assert history["test"]["accuracy"] >= reference - 0.01


def test_mnist1d_cnn_reaches_90_percent():
    data = fml.data.load("mnist1d")
    _, history = fml.fit(
        presets.mnist1d_cnn(), data, epochs=8, batch_size=100, learning_rate=3e-3, quiet=True
    )
    assert history["test"]["accuracy"] >= 0.90


def test_early_stopping_restores_best_validation_epoch(rng):
    x, y = _toy_classification(n=120, d=20)
    y = rng.permutation(y)  # pure noise labels: validation loss rises as it overfits
    model = models.mlp([64, 3])
    state, history = fml.fit(
        model, (x, y), epochs=40, validation=0.25, patience=3, learning_rate=3e-2, quiet=True
    )
    best = int(np.argmin(history["val_loss"]))
    assert history["best_epoch"] == best
    assert len(history["val_loss"]) == best + 4  # stopped `patience` epochs after the best
    got = fml.evaluate(model, state.params, x[90:], y[90:])["loss"]
    assert got == pytest.approx(history["val_loss"][best], rel=1e-5)


def test_schedules_and_custom_optax_transformations():
    data = fml.data.load("iris")
    model = models.logistic_regression(3)
    schedule = optax.exponential_decay(0.1, transition_steps=10, decay_rate=0.5)
    _, h1 = fml.fit(model, data, learning_rate=schedule, epochs=5, quiet=True)
    _, h2 = fml.fit(model, data, optimizer=optax.sgd(0.1), epochs=5, quiet=True)
    assert h1["test"]["accuracy"] > 0.8 and h2["test"]["accuracy"] > 0.8


def test_regression_mlp_defaults_to_mse_and_r2():
    data = fml.data.load("diabetes")
    model = models.mlp([16, 1])
    state, history = fml.fit(model, data, epochs=3, quiet=True)
    assert set(history["test"]) == {"loss", "r2"}
    pred = np.asarray(model.apply(state.params, data.x_test))[:, 0]
    want_mse = np.mean((pred - data.y_test) ** 2)
    assert history["test"]["loss"] == pytest.approx(want_mse, rel=1e-5)
