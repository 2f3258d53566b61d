"""The seed examples, in fml: the small programs fml was started from.

Each example trains one model, writes one run directory and returns an `Example`
row. MNIST and CIFAR-10 come from tensorflow-datasets when they are available;
otherwise the embedded digits set stands in, and the row says so.

    python experiments/seed_examples.py [--out runs/seed_examples] [--scale 1.0]
"""

import pathlib
import sys
import time
from typing import NamedTuple

import numpy as np

from fml import experiment, models
from fml.train import fit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # as a script: the repo root
from experiments import tables  # noqa: E402

# What the classifier examples must reach on their data (digits, breast_cancer, MNIST).
MIN_ACCURACY = 0.9


class Example(NamedTuple):
    name: str
    data: str
    result: str
    check: str
    seconds: float
    run_dir: pathlib.Path


def line_data(n: int = 200, noise: float = 0.1, seed: int = 0):
    """`x ~ U(-1, 1)` of shape `[n, 1]`, `y = 2x + 1 + N(0, noise²)`."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 1)).astype(np.float32)
    y = (2.0 * x[:, 0] + 1.0 + noise * rng.standard_normal(n)).astype(np.float32)
    return x, y


def plane_data(n: int = 200, noise: float = 0.1, seed: int = 0):
    """The 2 -> 1 problem: `y = 3 x0 - 1.5 x1 + 0.5 + N(0, noise²)`, `x ~ N(0, I)`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    y = (x @ np.array([3.0, -1.5]) + 0.5 + noise * rng.standard_normal(n)).astype(np.float32)
    return x, y


def _fit_synthetic(name, data_text, x, y, out, scale):
    """SGD (lr 0.05, batch 16, 100 epochs times `scale`) on MSE for a
    `linear_regression` model on arrays, 20% held out; writes the run.

    Returns `(w, b, val MSE, seconds, run_dir)`."""
    model = models.linear_regression()
    config = {
        "family": "linear_regression",
        "dataset": data_text,
        "input_shape": list(x.shape[1:]),
        "task": "regression",
        "optimizer": "sgd",
        "learning_rate": 0.05,
        "epochs": max(1, round(100 * scale)),
        "batch_size": 16,
        "validation": 0.2,
        "device": experiment.device_description(),
    }
    started = time.perf_counter()
    state, history = fit(
        model,
        (x, y),
        **{k: config[k] for k in ("optimizer", "learning_rate", "epochs", "batch_size")},
        validation=config["validation"],
        fused=True,
        quiet=True,
    )
    seconds = time.perf_counter() - started
    run_dir = experiment.write_run(
        pathlib.Path(out) / name, model, state.params, config, history, title=name
    )
    w = np.asarray(state.params["dense"]["w"])[:, 0]
    b = float(np.asarray(state.params["dense"]["b"])[0])
    return w, b, history["val_loss"][-1], seconds, run_dir


def line(out, *, scale: float = 1.0, log=print) -> Example:
    """Linear regression on `y = 2x + 1 + noise` by SGD; recovers slope and intercept."""
    del log
    text = "y = 2x + 1 + N(0, 0.1²), 200 points"
    w, b, _, seconds, run_dir = _fit_synthetic("line", text, *line_data(), out, scale)
    ok = abs(w[0] - 2.0) <= 0.05 and abs(b - 1.0) <= 0.05
    return Example(
        "linear regression, y = 2x + 1 + noise (SGD)",
        "synthetic, 200 points",
        f"slope {w[0]:.4f}, intercept {b:.4f}",
        f"both within 0.05 of (2, 1): {'yes' if ok else '**no**'}",
        seconds,
        run_dir,
    )


def plane(out, *, scale: float = 1.0, log=print) -> Example:
    """The 2 -> 1 linear model trained by SGD on MSE."""
    del log
    text = "y = 3 x0 - 1.5 x1 + 0.5 + N(0, 0.1²), 200 points"
    w, b, val_mse, seconds, run_dir = _fit_synthetic("plane", text, *plane_data(), out, scale)
    error = float(np.abs(np.append(w, b) - [3.0, -1.5, 0.5]).max())
    return Example(
        "linear 2 → 1, SGD on MSE",
        "synthetic, 200 points",
        f"w ({w[0]:.3f}, {w[1]:.3f}), b {b:.3f}; val MSE {val_mse:.4f}",
        f"max abs error vs (3, -1.5, 0.5): {error:.4f}",
        seconds,
        run_dir,
    )


def _preset_run(name, family, dataset, out, scale, *, log) -> Example:
    """`family`'s recipe for `dataset` through `experiment.train_and_evaluate`."""
    config = experiment.make_config(family, dataset, fallback=experiment.FALLBACKS.get(dataset))
    config["epochs"] = max(1, round(config["epochs"] * scale))
    result = experiment.train_and_evaluate(
        config, pathlib.Path(out) / name, log=log, quiet=True, overwrite=True
    )
    used, accuracy = result.config["dataset"], result.test["accuracy"]
    data = used if used == dataset else f"{used} (**{dataset} unavailable here, fallback**)"
    return Example(
        f"{name}: {family}, {config['optimizer']} lr {config['learning_rate']:g}, "
        f"{config['epochs']} epochs",
        data,
        f"test accuracy {accuracy:.4f}",
        f"≥ {MIN_ACCURACY}: {'yes' if accuracy >= MIN_ACCURACY else '**no**'}",
        result.seconds,
        result.run_dir,
    )


def mnist_mlp(out, *, scale: float = 1.0, log=print) -> Example:
    """MLP 784-128-10 with Adam (on digits: 64-128-10)."""
    return _preset_run("mnist_mlp", "mlp", "mnist", out, scale, log=log)


def mnist_cnn(out, *, scale: float = 1.0, log=print) -> Example:
    """The MNIST CNN (`presets.mnist_cnn`), Adam, 5 epochs."""
    return _preset_run("mnist_cnn", "cnn", "mnist", out, scale, log=log)


def cifar_cnn(out, *, scale: float = 1.0, log=print) -> Example:
    """The CIFAR-style CNN (`presets.cifar_cnn`) with SGD momentum 0.9."""
    return _preset_run("cifar_cnn", "cnn", "cifar10", out, scale, log=log)


def soft_margin_svm(out, *, scale: float = 1.0, log=print) -> Example:
    """A soft-margin linear SVM (hinge loss, L2 penalty 1 / (C n), C = 1)."""
    return _preset_run("svm", "svm", "breast_cancer", out, scale, log=log)


EXAMPLES = (line, plane, mnist_mlp, mnist_cnn, cifar_cnn, soft_margin_svm)


def markdown(examples: list[Example]) -> str:
    header = ["example", "data used", "result", "check", "train s"]
    rows = [[e.name, e.data, e.result, e.check, f"{e.seconds:.1f}"] for e in examples]
    return tables.markdown_table(header, rows)


def seed_table(out, *, scale: float = 1.0, log=print):
    """Runs every seed example; prints the table and writes `out/table.md`."""
    device = experiment.device_description()
    log(f"seed examples on {device}")
    examples = [example(out, scale=scale, log=log) for example in EXAMPLES]
    table = markdown(examples)
    log(table)
    return examples, tables.save_table(table, out, device=device)


if __name__ == "__main__":
    tables.script_main(__doc__, "runs/seed_examples", seed_table)
