"""Experiments: one config in, one run directory out.

`train_and_evaluate(config, workdir)` (in the style of Flax's examples/mnist)
loads the data set the config names (falling back to an embedded one, and saying
so, when it is not available), builds the family's preset model for that data,
trains it with `fml.fit`, and writes the run directory of `fml.rundir` plus
`curves.png`. `evaluate_run(run_dir)` reloads a run with no user code and
reproduces its test metrics exactly.

Example:
  >>> from fml import experiment
  >>> config = experiment.make_config("mlp", "mnist1d", epochs=2)
  >>> result = experiment.train_and_evaluate(config, "runs/mlp")  # doctest: +SKIP
  >>> experiment.evaluate_run("runs/mlp")["accuracy"] == result.test["accuracy"]  # doctest: +SKIP
  True
"""

import json
import math
import pathlib
import time
from typing import NamedTuple

import jax
import numpy as np

from fml import data as data_lib
from fml import plots, rundir
from fml.errors import ConfigError, FmlError
from fml.models import presets
from fml.train import evaluate, fit

# What a config holds; `make_config` fills the rest from the family's recipe.
CONFIG_KEYS = (
    "family",
    "dataset",
    "cell",
    "epochs",
    "batch_size",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "seed",
    "validation",
    "fallback",
)

# When a named (TFDS) set cannot be loaded, the embedded set of the same kind
# (real MNIST digits for the 28x28 grey sets).
FALLBACKS = {
    "mnist": "mnist5k",
    "fashion_mnist": "mnist5k",
    "kmnist": "mnist5k",
    "emnist": "mnist5k",
    "cifar10": "digits",
    "cifar100": "digits",
}


class RunResult(NamedTuple):
    """What `train_and_evaluate` returns.

    Attributes:
      run_dir: the run directory written.
      test: final test metrics, `{"loss": ..., "accuracy" | "r2": ...}`.
      seconds: wall-clock seconds of `fit` (compilation included).
      config: the config as saved (with the data set actually used).
      history: the per-epoch history.
      state: the final `TrainState`.
    """

    run_dir: pathlib.Path
    test: dict
    seconds: float
    config: dict
    history: dict
    state: object


def device_description() -> str:
    """The device JAX trains on, e.g. "CPU (cpu) x 1" or "GPU (NVIDIA H100 80GB HBM3) x 1"."""
    devices = jax.devices()
    return f"{devices[0].platform.upper()} ({devices[0].device_kind}) x {len(devices)}"


def make_config(family: str, dataset: str, **overrides) -> dict:
    """A complete experiment config: the family's recipe for `dataset`, then `overrides`.

    Args:
      family: one of `fml.models.presets.FAMILIES`.
      dataset: a name `fml.data.load` knows (or one in `FALLBACKS`).
      **overrides: any of `CONFIG_KEYS`; `None` values are ignored.

    Returns:
      a JSON-serialisable dict.
    """
    unknown_keys = set(overrides) - set(CONFIG_KEYS)
    if unknown_keys:
        raise ConfigError(
            f"unknown config keys {sorted(unknown_keys)}; expected some of {list(CONFIG_KEYS)}"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cell = overrides.get("cell", "gru")
    recipe = presets.recipe(family, dataset, cell=cell)
    config = {
        "family": family,
        "dataset": dataset,
        "cell": cell if family == "rnn" else None,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "optimizer": recipe.optimizer,
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "seed": 0,
        "validation": 0.1,
        "fallback": FALLBACKS.get(dataset),
    }
    config.update(overrides)
    if not 0.0 <= config["validation"] < 1.0:
        raise ConfigError(f"expected validation fraction in [0, 1), got {config['validation']}")
    return config


def load_data(config: dict, *, log=print):
    """`(dataset, name_used)`: the config's data set, or its fallback when that fails.

    The validation split (seed 0, so every training seed sees the same split) is
    taken from train before any standardisation, so `evaluate_run` can rebuild it.
    """
    name, fallback = config["dataset"], config.get("fallback")
    kwargs = {"validation": config["validation"]}
    try:
        return data_lib.load(name, **kwargs), name
    except FmlError as e:
        if not fallback:
            raise
        log(f"data: {name!r} is not available here ({e}); using embedded {fallback!r} instead")
        return data_lib.load(fallback, **kwargs), fallback


def build_model(config: dict, dataset):
    """The model of `config`'s recipe (for the data set it asked for, so a fallback
    keeps the requested architecture) sized to `dataset`'s inputs and classes."""
    outputs = dataset.num_classes if dataset.task == "classification" else 1
    recipe = presets.recipe(config["family"], config["dataset"], cell=config.get("cell") or "gru")
    return recipe.build(dataset.input_shape, outputs)


def train_and_evaluate(
    config: dict, workdir, *, log=print, checkpoint: bool = False, resume: bool = False
) -> RunResult:
    """Trains the model `config` describes and writes its run directory.

    Args:
      config: from `make_config`.
      workdir: the run directory (created; existing files are replaced atomically).
      log: where progress lines go (`print`, or `lambda *_: None` for silence).
      checkpoint: save the whole run state every epoch into `workdir/checkpoints`.
      resume: continue the run checkpointed in `workdir` up to `config["epochs"]`
        (implies `checkpoint`).

    Returns:
      a `RunResult`.
    """
    dataset, used = load_data(config, log=log)
    model = build_model(config, dataset)
    config = {
        **config,
        "dataset": used,
        "dataset_requested": config["dataset"],
        "input_shape": list(dataset.input_shape),
        "task": dataset.task,
        "num_classes": dataset.num_classes,
        "device": device_description(),
    }
    optimizer_kwargs = {"weight_decay": config["weight_decay"]} if config["weight_decay"] else None
    started = time.perf_counter()
    state, history = fit(
        model,
        dataset,
        optimizer=config["optimizer"],
        learning_rate=config["learning_rate"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        fused=True,
        quiet=True,
        optimizer_kwargs=optimizer_kwargs,
        checkpoint_dir=pathlib.Path(workdir) if checkpoint or resume else None,
        resume=resume,
    )
    seconds = time.perf_counter() - started
    config["train_seconds"] = seconds
    title = f"{config['family']} on {used} (seed {config['seed']})"
    run_dir = write_run(workdir, model, state.params, config, history, title=title)
    return RunResult(run_dir, dict(history["test"]), seconds, config, history, state)


def finished_run(config: dict, workdir) -> tuple[dict, float] | None:
    """`(test metrics, train seconds)` of a run already in `workdir` that was made
    from this same `config`, or None (no run there, or a different config)."""
    workdir = pathlib.Path(workdir)
    try:
        saved = json.loads((workdir / "config.json").read_text())
        test = json.loads((workdir / "history.json").read_text())["test"]
    except (OSError, ValueError, KeyError):
        return None
    saved = {**saved, "dataset": saved.get("dataset_requested", saved.get("dataset"))}
    if any(saved.get(k) != config.get(k) for k in CONFIG_KEYS):
        return None
    return test, saved.get("train_seconds", math.nan)


def write_run(workdir, model, params, config: dict, history: dict, *, title: str = ""):
    """`fml.rundir.save_run` plus `curves.png` when the history has epochs; returns
    the directory."""
    run_dir = rundir.save_run(workdir, model=model, params=params, config=config, history=history)
    if history.get("train_loss"):
        plots.learning_curves(history, run_dir / "curves.png", title=title)
    return run_dir


def evaluate_run(run_dir, dataset: str | None = None) -> dict:
    """Test metrics of a saved run, recomputed from its files alone.

    Args:
      run_dir: a directory written by `train_and_evaluate` (or `fml train`).
      dataset: evaluate on this data set's test split instead of the run's own.

    Returns:
      `{"loss": ..., "accuracy" | "r2": ...}`; on the run's own data set these equal
      the saved `history.json["test"]` exactly.
    """
    model, params, config = rundir.load_run(run_dir)
    name = dataset or config["dataset"]
    data = data_lib.load(name, validation=config.get("validation", 0.0))
    if tuple(data.input_shape) != tuple(config["input_shape"]):
        raise ConfigError(
            f"run {run_dir} expects inputs of shape {tuple(config['input_shape'])}, "
            f"but {name!r} has {data.input_shape}"
        )
    return evaluate(model, params, data.x_test, data.y_test, task=data.task)


# ------------------------------------------------------------------ tables


def mean_std(values) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std())


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 4 decimals."""

    def cell(value):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_table(table: str, out, *, device: str | None = None) -> pathlib.Path:
    """Writes `table` (with the device line above it) to `out/table.md`; returns the path."""
    text = f"Device: {device or device_description()}\n\n{table}\n"
    path = pathlib.Path(out) / "table.md"
    rundir.atomic_write(path, text.encode())
    return path


def script_main(doc: str, default_out: str, make_table) -> None:
    """The command line of a table experiment: `--out DIR --scale S`, then
    `make_table(out, scale=S)` (which prints the table) and where it was written."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every epoch budget")
    args = parser.parse_args()
    _, path = make_table(args.out, scale=args.scale)
    print(f"\ntable written to {path}; run directories under {args.out}/")
