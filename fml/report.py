"""The main job: every family trained on a fitting embedded data set, one table
with a reference figure per row (the MNIST-1D paper, or scikit-learn's own
estimator trained in the same run)."""

import pathlib
import time
from typing import NamedTuple

import jax

from fml import data as data_lib
from fml import models
from fml.models import presets
from fml.train import evaluate, fit

# Test accuracy reported in Greydanus & Kobak, "Scaling down deep learning with MNIST-1D".
MNIST1D_PAPER = {"logistic_regression": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91}


class Row(NamedTuple):
    family: str
    dataset: str
    metric: str
    value: float
    reference: float
    reference_source: str
    seconds: float


def _sklearn_reference(estimator, dataset, metric):
    from sklearn.metrics import accuracy_score, r2_score

    x_train = dataset.x_train.reshape(len(dataset.x_train), -1)
    x_test = dataset.x_test.reshape(len(dataset.x_test), -1)
    estimator.fit(x_train, dataset.y_train)
    score = accuracy_score if metric == "accuracy" else r2_score
    return float(score(dataset.y_test, estimator.predict(x_test)))


def _fit_row(family, dataset, model, reference, source, **fit_kwargs) -> Row:
    started = time.perf_counter()
    _, history = fit(model, dataset, quiet=True, **fit_kwargs)
    seconds = time.perf_counter() - started
    metric, value = [(k, v) for k, v in history["test"].items() if k != "loss"][0]
    return Row(family, dataset.name, metric, value, reference, source, seconds)


def main_rows(quick: bool = False) -> list[Row]:
    """Trains the main job's models; `quick` shrinks every budget (smoke tests)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.svm import LinearSVC

    scale = 0.1 if quick else 1.0

    def epochs(n):
        return max(1, int(n * scale))

    mnist1d = data_lib.load("mnist1d")
    cancer = data_lib.load("breast_cancer")
    diabetes = data_lib.load("diabetes")
    paper = "MNIST-1D paper"
    rows = [
        _fit_row(
            "logistic_regression",
            mnist1d,
            models.logistic_regression(10),
            MNIST1D_PAPER["logistic_regression"],
            paper,
            epochs=epochs(30),
            batch_size=100,
            learning_rate=1e-2,
            fused=True,
        ),
        _fit_row(
            "mlp",
            mnist1d,
            presets.mnist1d_mlp(),
            MNIST1D_PAPER["mlp"],
            paper,
            epochs=epochs(30),
            batch_size=100,
            learning_rate=1e-3,
            fused=True,
        ),
        _fit_row(
            "cnn",
            mnist1d,
            presets.mnist1d_cnn(),
            MNIST1D_PAPER["cnn"],
            paper,
            epochs=epochs(15),
            batch_size=100,
            learning_rate=2e-3,
        ),
        _fit_row(
            "rnn (gru)",
            mnist1d,
            presets.mnist1d_gru(),
            MNIST1D_PAPER["gru"],
            paper,
            epochs=epochs(30),
            batch_size=100,
            learning_rate=3e-3,
            fused=True,
        ),
    ]
    for family, model, estimator, name in [
        ("svm", models.svm(2), LinearSVC(C=1.0), "sklearn LinearSVC"),
        (
            "logistic_regression",
            models.logistic_regression(2),
            LogisticRegression(),
            "sklearn LogisticRegression",
        ),
    ]:
        reference = _sklearn_reference(estimator, cancer, "accuracy")
        rows.append(
            _fit_row(
                family,
                cancer,
                model,
                reference,
                name,
                epochs=epochs(50),
                batch_size=32,
                learning_rate=1e-2,
                fused=True,
            )
        )
    reference = _sklearn_reference(LinearRegression(), diabetes, "r2")
    started = time.perf_counter()
    model = models.linear_regression()
    params = models.least_squares(model, diabetes.x_train, diabetes.y_train)
    r2 = evaluate(model, params, diabetes.x_test, diabetes.y_test, task="regression")["r2"]
    rows.append(
        Row(
            "linear_regression (closed form)",
            "diabetes",
            "r2",
            r2,
            reference,
            "sklearn LinearRegression",
            time.perf_counter() - started,
        )
    )
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| family | data set | metric | fml | reference | reference source | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.dataset} | {r.metric} | {r.value:.4f} | "
            f"{r.reference:.4f} | {r.reference_source} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main_job(out: str = "runs/main", quick: bool = False) -> list[Row]:
    """Runs `main_rows`, prints the markdown table and writes it to `out/table.md`."""
    device = jax.devices()[0]
    print(f"fml main job on {device.platform.upper()} ({device.device_kind})", flush=True)
    rows = main_rows(quick)
    table = markdown_table(rows)
    print(table)
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "table.md").write_text(table + "\n")
    print(f"\ntable written to {path / 'table.md'}")
    return rows
