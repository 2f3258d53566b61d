"""Convex fits: full-batch lbfgs as one program, its tolerance, the closed form."""

import jax
import numpy as np
import pytest

import fml
from fml import models, train


def _per_step_lbfgs(model, x, y, *, iterations, l2, loss=None):
    """The reference: `train_step` jitted and called once per iteration, as `fit`
    ran lbfgs before it ran all iterations in one program."""
    objective = train.make_objective(model, loss)
    tx = train.make_optimizer("lbfgs")
    state = train.init_state(model, tx, x.shape[1:], l2=l2)
    step = jax.jit(train.make_train_step(model, objective, tx))
    batch = {"x": x, "y": y, "mask": np.ones(len(x), np.float32)}
    losses, accuracies = [], []
    for _ in range(iterations):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        accuracies.append(float(metrics["accuracy"]))
    return state, losses, accuracies


@pytest.mark.parametrize(
    "family",
    ["logistic_regression", "softmax_regression", "svm", "mlp"],
)
def test_one_program_lbfgs_equals_per_step_lbfgs(family):
    data = fml.data.load("breast_cancer")
    x, y = data.x_train, data.y_train
    model = {
        "logistic_regression": models.logistic_regression(2),
        "softmax_regression": models.logistic_regression(2, binary="softmax"),
        "svm": models.svm(2, loss="squared_hinge"),
        "mlp": models.mlp([8, 2]),  # not a linear family: the generic step in the loop
    }[family]
    l2 = 1.0 / len(x)
    want, losses, accuracies = _per_step_lbfgs(model, x, y, iterations=15, l2=l2)
    got, history = fml.fit(model, (x, y), optimizer="lbfgs", epochs=15, l2=l2, quiet=True)
    assert history["epoch"] == list(range(15))
    np.testing.assert_allclose(history["train_loss"], losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history["train_accuracy"], accuracies, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        got.params,
        want.params,
    )
    assert int(got.step) == 15


def test_one_program_lbfgs_does_not_recompile_on_a_second_fit(backend_compiles):
    data = fml.data.load("breast_cancer")
    model = models.logistic_regression(2)
    kwargs = dict(optimizer="lbfgs", quiet=True, l2=1e-3)
    fml.fit(model, (data.x_train, data.y_train), epochs=7, **kwargs)
    compiles = backend_compiles()
    fml.fit(model, (data.x_train, data.y_train), epochs=7, **{**kwargs, "l2": 0.5})
    fml.fit(model, (data.x_train, data.y_train), epochs=5, tol=1e-4, **kwargs)  # same capacity
    assert compiles == []


def test_tol_stops_at_sklearns_optimum():
    from sklearn.linear_model import LogisticRegression

    data = fml.data.load("breast_cancer")
    n = len(data.x_train)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(
        data.x_train, data.y_train
    )
    model = models.logistic_regression(2)
    state, history = fml.fit(
        model, data, optimizer="lbfgs", epochs=500, l2=1.0 / n, quiet=True, tol=1e-6
    )
    ran = len(history["train_loss"])
    assert 5 < ran < 500  # stopped early, by the tolerance
    assert int(state.step) == ran
    np.testing.assert_allclose(state.params["dense"]["w"][:, 0], reference.coef_[0], atol=2e-3)
    np.testing.assert_allclose(state.params["dense"]["b"], reference.intercept_, atol=2e-3)
    # the same iterates as without a tolerance, up to where it stopped
    _, full = fml.fit(model, data, optimizer="lbfgs", epochs=ran, l2=1.0 / n, quiet=True)
    np.testing.assert_allclose(history["train_loss"], full["train_loss"], rtol=1e-6)


def test_tol_is_for_full_batch_optimizers_only():
    data = fml.data.load("iris")
    with pytest.raises(fml.errors.ConfigError, match="tol"):
        fml.fit(models.logistic_regression(3), data, optimizer="adam", tol=1e-4, quiet=True)
    with pytest.raises(fml.errors.ConfigError, match="tol"):
        fml.fit(models.logistic_regression(3), data, optimizer="lbfgs", tol=-1.0, quiet=True)


def test_lbfgs_resumed_from_checkpoints_equals_one_run(tmp_path):
    data = fml.data.load("breast_cancer")
    model = models.logistic_regression(2)
    kwargs = dict(optimizer="lbfgs", l2=1e-3, quiet=True, checkpoint_every_epochs=4)
    whole, h_whole = fml.fit(model, data, epochs=10, **kwargs)
    fml.fit(model, data, epochs=6, checkpoint_dir=tmp_path / "run", **kwargs)
    resumed, h_resumed = fml.fit(
        model, data, epochs=10, checkpoint_dir=tmp_path / "run", resume=True, **kwargs
    )
    np.testing.assert_allclose(h_resumed["train_loss"], h_whole["train_loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        resumed.params,
        whole.params,
    )


def _numpy_ridge(x, y, l2):
    """Independent reference: numpy lstsq on the float64 design with an unpenalised
    intercept column and `sqrt(l2) I` rows appended for the ridge."""
    x = x.astype(np.float64).reshape(len(x), -1)
    d = x.shape[1]
    design = np.c_[x, np.ones(len(x))]
    targets = y.astype(np.float64).reshape(len(y), -1)
    if l2 > 0:
        design = np.r_[design, np.c_[np.sqrt(l2) * np.eye(d), np.zeros(d)]]
        targets = np.r_[targets, np.zeros((d, targets.shape[1]))]
    coef = np.linalg.lstsq(design, targets, rcond=None)[0]
    return coef[:-1], coef[-1]


@pytest.mark.parametrize("l2", [0.0, 3.0])
@pytest.mark.parametrize("outputs", [1, 3])
def test_least_squares_equals_numpy_lstsq(l2, outputs):
    rng = np.random.default_rng(1)
    n, d = 20_000, 30  # several row blocks; features far from zero mean
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d) + 50).astype(np.float32)
    w_true = rng.standard_normal((d, outputs))
    y = (x @ w_true + 0.1 * rng.standard_normal((n, outputs))).astype(np.float32)
    y = y[:, 0] if outputs == 1 else y
    params = models.least_squares(models.linear_regression(outputs), x, y, l2=l2)
    w, b = _numpy_ridge(x, y, l2)
    # float64 solutions, rounded to the float32 params
    np.testing.assert_allclose(params["dense"]["w"], w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["dense"]["b"], b, rtol=1e-6, atol=1e-5)


def test_least_squares_rank_deficient_takes_the_minimum_norm_solution():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 4)).astype(np.float32)
    x = np.c_[x, x[:, :1]]  # a repeated column: the Gram matrix is singular
    y = (x @ np.arange(1.0, 6.0) + 1.0).astype(np.float32)
    params = models.least_squares(models.linear_regression(), x, y)
    w, b = _numpy_ridge(x, y, 0.0)
    np.testing.assert_allclose(params["dense"]["w"], w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params["dense"]["b"], b, rtol=1e-5, atol=1e-5)


def test_least_squares_r2_equals_sklearn_linear_regression():
    from sklearn.linear_model import LinearRegression

    from benchmarks._convex import synthetic_problem

    x, y, x_test, y_test = synthetic_problem(50_000, "regression")
    model = models.linear_regression()
    params = models.least_squares(model, x, y)
    got = fml.evaluate(model, params, x_test, y_test, task="regression")["r2"]
    want = LinearRegression().fit(x, y).score(x_test, y_test)
    assert abs(got - want) < 1e-5
