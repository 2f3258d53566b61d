"""scikit-learn parity: each fml family next to scikit-learn's estimator, both
trained in the same run on the same arrays of scikit-learn's bundled sets.

Criteria (`Case.check`): linear regression's closed form equals LinearRegression's
R² to 1e-4 and SGD is within 0.01; logistic regression is within 1 point of
LogisticRegression (same objective: sklearn's default `C=1` L2 penalty is
`fit(l2=1 / (C n))`); the SVM reaches at least LinearSVC's accuracy (same
squared-hinge objective and `C`), and the MLP at least MLPClassifier's.

    python experiments/sklearn_parity.py [--out runs/parity] [--scale 1.0]
"""

import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import optax

from fml import data as data_lib
from fml import experiment, models
from fml.train import evaluate, fit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # as a script: the repo root
from experiments import tables  # noqa: E402


class Case(NamedTuple):
    """One parity row.

    Attributes:
      name: row label.
      dataset: an embedded data set.
      slug: the run directory's name.
      model: `model(dataset) -> Model`.
      fit_kwargs: `fml.fit` arguments (`l2` may be a function of the train size);
        None means the closed form `fml.models.least_squares`.
      estimator: `estimator() -> sklearn estimator`.
      criterion: "equal" (|fml - sklearn| <= tolerance), "within" (same, stated
        as a tolerance) or "at_least" (fml >= sklearn - tolerance).
      tolerance: see `criterion`.
    """

    name: str
    dataset: str
    slug: str
    model: Callable
    fit_kwargs: dict | None
    estimator: Callable
    criterion: str
    tolerance: float


class Result(NamedTuple):
    case: Case
    metric: str
    fml: float
    sklearn: float
    sklearn_name: str
    seconds: float
    run_dir: pathlib.Path | None

    @property
    def met(self) -> bool:
        gap = self.fml - self.sklearn
        if self.case.criterion == "at_least":
            return gap >= -self.case.tolerance
        return abs(gap) <= self.case.tolerance


# Minibatch SGD on diabetes (collinear features) needs a decaying step to settle.
_SGD_SCHEDULE = optax.exponential_decay(0.05, transition_steps=1000, decay_rate=0.1)
_SGD_SCHEDULE_TEXT = "0.05 * 0.1 ** (step / 1000)"


def _sklearn_l2(n: int, C: float = 1.0) -> float:
    """The `fit(l2=...)` that equals scikit-learn's `C` penalty on `n` examples."""
    return 1.0 / (C * n)


def cases() -> list[Case]:
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    def classes(d):
        return d.num_classes

    def logistic(name):
        return Case(
            "logistic_regression (L-BFGS, C=1)",
            name,
            f"logistic_regression-{name}",
            lambda d: models.logistic_regression(classes(d)),
            {"optimizer": "lbfgs", "epochs": 200, "l2": _sklearn_l2},
            lambda: LogisticRegression(C=1.0, max_iter=5000),
            "within",
            0.01,
        )

    def svm(name):
        return Case(
            "svm (squared hinge, C=1)",
            name,
            f"svm-{name}",
            lambda d: models.svm(classes(d), loss="squared_hinge", C=1.0),
            {"optimizer": "lbfgs", "epochs": 200},
            lambda: LinearSVC(C=1.0, max_iter=20000),
            "at_least",
            1e-6,
        )

    return [
        Case(
            "linear_regression (closed form)",
            "diabetes",
            "linear_regression-closed_form-diabetes",
            lambda d: models.linear_regression(),
            None,
            LinearRegression,
            "equal",
            1e-4,
        ),
        Case(
            "linear_regression (SGD)",
            "diabetes",
            "linear_regression-sgd-diabetes",
            lambda d: models.linear_regression(),
            {"optimizer": "sgd", "learning_rate": _SGD_SCHEDULE, "epochs": 300, "batch_size": 32},
            LinearRegression,
            "within",
            0.01,
        ),
        logistic("breast_cancer"),
        logistic("digits"),
        svm("breast_cancer"),
        svm("digits"),
        Case(
            "mlp 256 hidden, dropout 0.2 (Adam)",
            "digits",
            "mlp-digits",
            lambda d: models.mlp([256, classes(d)], dropout=0.2),
            {"optimizer": "adam", "learning_rate": 1e-3, "epochs": 100, "batch_size": 64},
            lambda: MLPClassifier(hidden_layer_sizes=(100,), max_iter=200, random_state=0),
            "at_least",
            1e-6,
        ),
    ]


def _flat(x):
    return np.asarray(x).reshape(len(x), -1)


def _sklearn_score(estimator, dataset) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score

    with warnings.catch_warnings():  # MLPClassifier's defaults stop before convergence
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(_flat(dataset.x_train), dataset.y_train)
    score = accuracy_score if dataset.task == "classification" else r2_score
    return float(score(dataset.y_test, estimator.predict(_flat(dataset.x_test))))


def _train(case: Case, model, dataset, scale: float):
    """`(params, history, fit arguments)` of fml's side of `case`."""
    if case.fit_kwargs is None:
        params = models.least_squares(model, dataset.x_train, dataset.y_train)
        test = evaluate(model, params, dataset.x_test, dataset.y_test, task=dataset.task)
        return params, {"test": test}, {"solver": "least_squares"}
    kwargs = dict(case.fit_kwargs)
    kwargs["epochs"] = max(1, round(kwargs["epochs"] * scale))
    if callable(kwargs.get("l2")):
        kwargs["l2"] = kwargs["l2"](len(dataset.x_train))
    fused = kwargs["optimizer"] != "lbfgs"
    state, history = fit(model, dataset, quiet=True, fused=fused, **kwargs)
    if kwargs.get("learning_rate") is _SGD_SCHEDULE:
        kwargs["learning_rate"] = _SGD_SCHEDULE_TEXT
    return state.params, history, kwargs


def run_case(case: Case, out=None, *, scale: float = 1.0) -> Result:
    """Trains fml's model and scikit-learn's estimator on the same arrays.

    Args:
      case: the row.
      out: if given, fml's run directory goes to `out/SLUG`.
      scale: multiplies fml's epochs (smoke tests use a small one).
    """
    dataset = data_lib.load(case.dataset)
    model = case.model(dataset)
    started = time.perf_counter()
    params, history, fit_args = _train(case, model, dataset, scale)
    seconds = time.perf_counter() - started
    metric = "accuracy" if dataset.task == "classification" else "r2"
    estimator = case.estimator()
    reference = _sklearn_score(estimator, dataset)
    run_dir = None
    if out is not None:
        config = {
            "family": model.family,
            "dataset": case.dataset,
            "input_shape": list(dataset.input_shape),
            "task": dataset.task,
            "num_classes": dataset.num_classes,
            "validation": 0.0,
            **fit_args,
            "sklearn": {"estimator": repr(estimator), metric: reference},
            "device": experiment.device_description(),
        }
        run_dir = experiment.write_run(
            pathlib.Path(out) / case.slug, model, params, config, history, title=case.name
        )
    return Result(
        case, metric, history["test"][metric], reference, type(estimator).__name__, seconds, run_dir
    )


def _criterion(case: Case) -> str:
    if case.criterion == "at_least":
        return "fml ≥ sklearn"
    if case.criterion == "equal":
        return f"equal to {case.tolerance:g}"
    return f"within {case.tolerance:g}"


def markdown(results: list[Result]) -> str:
    """The parity table."""
    header = [
        "fml model",
        "data set",
        "metric",
        "fml",
        "sklearn estimator",
        "sklearn",
        "criterion",
        "met",
        "fml train s",
    ]
    rows = [
        [
            r.case.name,
            r.case.dataset,
            r.metric,
            f"{r.fml:.4f}",
            r.sklearn_name,
            f"{r.sklearn:.4f}",
            _criterion(r.case),
            "yes" if r.met else f"**no** (gap {r.fml - r.sklearn:+.4f})",
            f"{r.seconds:.1f}",
        ]
        for r in results
    ]
    return tables.markdown_table(header, rows)


def parity_table(out, *, scale: float = 1.0, log=print) -> tuple[list[Result], pathlib.Path]:
    """Runs every case, prints the table and writes it to `out/table.md`."""
    device = experiment.device_description()
    log(f"scikit-learn parity on {device}")
    results = [run_case(case, out, scale=scale) for case in cases()]
    table = markdown(results)
    log(table)
    return results, tables.save_table(table, out, device=device)


if __name__ == "__main__":
    tables.script_main(__doc__, "runs/parity", parity_table)
