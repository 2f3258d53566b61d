"""Convex fits against scikit-learn on synthetic data, at equal test accuracy:
logistic regression and the linear SVM with full-batch L-BFGS (all iterations
in one program, stopped at scikit-learn's default tolerance), linear regression
in closed form."""

import time
from typing import NamedTuple

import numpy as np

from fml import models, train

FEATURES = 100
# scikit-learn's default tolerance of LogisticRegression and LinearSVC; fml's lbfgs
# stops on the same max-abs gradient of the same mean objective.
TOL = 1e-4
SIZES = (100_000, 1_000_000)


class ConvexTiming(NamedTuple):
    problem: str
    n: int
    fml_s: float  # warm: the same fit run a second time (compiled programs reused)
    fml_first_s: float  # the first fit, compile included
    sklearn_s: float
    fml_score: float
    sklearn_score: float
    metric: str
    how: str


def synthetic_problem(n: int, task: str, seed: int = 0):
    """`(x_train, y_train, x_test, y_test)`: `n` train and `n // 5` test examples
    of `FEATURES` standard-normal features; labels from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    total = n + n // 5
    x = rng.standard_normal((total, FEATURES), dtype=np.float32)
    w = rng.standard_normal(FEATURES).astype(np.float32) / np.sqrt(FEATURES)
    score = x @ w + 0.5 * rng.standard_normal(total).astype(np.float32)
    y = (score > 0).astype(np.int32) if task == "classification" else score.astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _fml_classifier(model, x, y, x_test, y_test, iterations, l2):
    def run():
        state, _ = train.fit(
            model,
            (x, y),
            optimizer="lbfgs",
            epochs=iterations,
            tol=TOL,
            fused=True,
            quiet=True,
            l2=l2,
        )
        return train.evaluate(model, state.params, x_test, y_test)["accuracy"]

    first_s, _ = _timed(run)
    seconds, accuracy = _timed(run)
    return seconds, first_s, accuracy


def _sklearn(estimator, x, y, x_test, y_test):
    seconds, _ = _timed(lambda: estimator.fit(x, y))
    return seconds, float(estimator.score(x_test, y_test))


def logistic(n: int, iterations: int = 20) -> ConvexTiming:
    from sklearn.linear_model import LogisticRegression

    x, y, x_test, y_test = synthetic_problem(n, "classification")
    fml_s, first_s, accuracy = _fml_classifier(
        models.logistic_regression(2), x, y, x_test, y_test, iterations, l2=1.0 / n
    )
    sk_s, sk_accuracy = _sklearn(LogisticRegression(C=1.0), x, y, x_test, y_test)
    how = f"fit(lbfgs, <= {iterations} it., tol={TOL}) vs LogisticRegression(lbfgs, C=1)"
    return ConvexTiming(
        "logistic regression", n, fml_s, first_s, sk_s, accuracy, sk_accuracy, "accuracy", how
    )


def linear_svm(n: int, iterations: int = 20) -> ConvexTiming:
    from sklearn.svm import LinearSVC

    x, y, x_test, y_test = synthetic_problem(n, "classification")
    model = models.svm(2, loss="squared_hinge", C=1.0)
    fml_s, first_s, accuracy = _fml_classifier(
        model, x, y, x_test, y_test, iterations, l2=models.l2_strength(model.spec, n)
    )
    sk_s, sk_accuracy = _sklearn(LinearSVC(C=1.0), x, y, x_test, y_test)
    how = f"svm(squared_hinge) fit(lbfgs, <= {iterations} it., tol={TOL}) vs LinearSVC(C=1)"
    return ConvexTiming(
        "linear SVM", n, fml_s, first_s, sk_s, accuracy, sk_accuracy, "accuracy", how
    )


def linear_regression(n: int) -> ConvexTiming:
    from sklearn.linear_model import LinearRegression

    x, y, x_test, y_test = synthetic_problem(n, "regression")
    model = models.linear_regression()

    def run():
        params = models.least_squares(model, x, y)
        return train.evaluate(model, params, x_test, y_test, task="regression")["r2"]

    first_s, _ = _timed(run)
    fml_s, r2 = _timed(run)
    sk_s, sk_r2 = _sklearn(LinearRegression(), x, y, x_test, y_test)
    how = "least_squares vs LinearRegression"
    return ConvexTiming("linear regression", n, fml_s, first_s, sk_s, r2, sk_r2, "R2", how)


def convex_fits(sizes=SIZES, log=print) -> list[ConvexTiming]:
    results = []
    for n in sizes:
        for fit_fn in (logistic, linear_svm, linear_regression):
            log(f"[bench] convex: {fit_fn.__name__} n={n}")
            results.append(fit_fn(n))
    return results
