"""Experiments: one config in, one run directory out.

`train_and_evaluate(config, workdir)` (in the style of Flax's examples/mnist)
loads the data set the config names (falling back to an embedded one only when
the config's `fallback` asks, and then saying so and naming it in the run),
builds the family's preset model for that data, trains it with `fml.fit`, and
writes the run directory of `fml.rundir` (with the data set's preprocessing) plus
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

from fml import batching, plots, rundir
from fml import data as data_lib
from fml import preprocessing as preprocessing_lib
from fml.errors import CheckpointError, ConfigError, DataError
from fml.inference import evaluate
from fml.lock import run_lock
from fml.models import default_loss, presets
from fml.step import make_schedule
from fml.train import fit

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
    "schedule",
    "clip_norm",
    "seed",
    "validation",
    "fallback",
)

# The embedded set of the same kind as a TFDS set, to name in errors and to use
# when a config asks for a fallback (`fallback="digits"`, `fml train --fallback digits`).
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
        "schedule": recipe.schedule,
        "clip_norm": recipe.clip_norm,
        "seed": 0,
        "validation": 0.1,
        "fallback": None,
    }
    config.update(overrides)
    if not 0.0 <= config["validation"] < 1.0:
        raise ConfigError(f"expected validation fraction in [0, 1), got {config['validation']}")
    return config


def load_data(config: dict, *, log=print):
    """`(dataset, name_used)`: the config's data set, or, when that cannot be loaded
    and the config names a `fallback`, that one (said in `log`). Without a fallback,
    a set that is not here is a `DataError` that says how to get it.

    The validation split (seed 0, so every training seed sees the same split) is
    taken from train before any standardisation, so `evaluate_run` can rebuild it.
    """
    name, fallback = config["dataset"], config.get("fallback")
    kwargs = {"validation": config["validation"]}
    try:
        return data_lib.load(name, **kwargs), name
    except DataError as e:
        if not fallback:
            hint = FALLBACKS.get(name)
            if hint is None:
                raise
            raise DataError(
                f"{e} To train on the embedded {hint!r} set instead, ask for it: "
                f"`fml train ... --fallback {hint}` (fallback={hint!r} in a config)."
            ) from None
        log(f"data: {name!r} is not available here ({e}); using embedded {fallback!r} instead")
        return data_lib.load(fallback, **kwargs), fallback


def build_model(config: dict, dataset):
    """The model of `config`'s recipe (for the data set it asked for, so a fallback
    keeps the requested architecture) sized to `dataset`'s inputs and classes."""
    outputs = dataset.num_classes if dataset.task == "classification" else 1
    recipe = presets.recipe(config["family"], config["dataset"], cell=config.get("cell") or "gru")
    return recipe.build(dataset.input_shape, outputs)


# How `run_name` spells a setting that differs from the recipe's.
_NAME_PARTS = {
    "optimizer": "{}",
    "learning_rate": "lr{:g}",
    "batch_size": "bs{}",
    "weight_decay": "wd{:g}",
    "schedule": "{}",
    "clip_norm": "clip{:g}",
}


def run_name(config: dict) -> str:
    """The default run directory name: family, RNN cell, the data set used (and the
    one asked for, when a fallback stood in), every setting that differs from the
    recipe's (optimizer, learning rate, batch size, weight decay, schedule, gradient
    clipping, validation) and
    the seed; not the epochs, so that `--resume` with more epochs finds the run.

    Example: `rnn-lstm-mnist1d-lr0.01-seed3`, `mlp-digits-for-mnist-seed0`.
    """
    requested = config.get("dataset_requested", config["dataset"])
    parts = [config["family"]]
    if config.get("cell"):
        parts.append(config["cell"])
    parts.append(config["dataset"])
    if requested != config["dataset"]:
        parts.append(f"for-{requested}")
    recipe = presets.recipe(config["family"], requested, cell=config.get("cell") or "gru")
    for key, spelling in _NAME_PARTS.items():
        if config.get(key) != getattr(recipe, key):
            parts.append(spelling.format(config[key]))
    if config.get("validation", 0.1) != 0.1:
        parts.append(f"val{config['validation']:g}")
    parts.append(f"seed{config['seed']}")
    return "-".join(parts)


def train_and_evaluate(
    config: dict,
    workdir=None,
    *,
    log=print,
    checkpoint: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    runs: str = "runs",
) -> RunResult:
    """Trains the model `config` describes and writes its run directory.

    Args:
      config: from `make_config`.
      workdir: the run directory; None: `runs/run_name(config)`. One that already
        holds a run is refused before any training (`fml.rundir.prepare`), unless
        `resume` or `overwrite`.
      log: where progress lines go (`print`, or `lambda *_: None` for silence).
      checkpoint: save the whole run state every epoch into `workdir/checkpoints`.
      resume: continue the run checkpointed in `workdir` up to `config["epochs"]`
        (implies `checkpoint`).
      overwrite: delete a run already in `workdir` first.
      quiet: no progress bar.
      runs: where default-named run directories go.

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
    workdir = pathlib.Path(runs) / run_name(config) if workdir is None else pathlib.Path(workdir)
    with run_lock(workdir, writer=jax.process_index() == 0):
        workdir = rundir.prepare(workdir, resume=resume, overwrite=overwrite)
        return _train(
            config, dataset, model, workdir, checkpoint=checkpoint, resume=resume, quiet=quiet
        )


def learning_rate(config: dict, num_train: int):
    """The config's learning rate for `fit`: a float, or its schedule (config key
    "schedule", `fml.step.make_schedule`) over the run's `epochs` of `num_train`
    examples. A schedule spans the epochs the config asks for and is part of the
    run's trajectory: resuming a scheduled run to more epochs is refused
    (`CheckpointError` naming learning_rate), as any other change of it is."""
    steps = config["epochs"] * batching.steps_per_epoch(num_train, config["batch_size"])
    return make_schedule(config.get("schedule"), config["learning_rate"], steps)


def _train(config: dict, dataset, model, workdir, *, checkpoint: bool, resume: bool, quiet: bool):
    """Trains and writes the run in `workdir` (locked and prepared)."""
    used = config["dataset"]
    rundir.save_preprocessing(workdir, dataset.preprocessing)
    optimizer_kwargs = {"weight_decay": config["weight_decay"]} if config["weight_decay"] else None
    started = time.perf_counter()
    state, history = fit(
        model,
        dataset,
        optimizer=config["optimizer"],
        learning_rate=learning_rate(config, len(dataset.x_train)),
        clip_norm=config.get("clip_norm"),
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        fused=True,
        quiet=quiet,
        optimizer_kwargs=optimizer_kwargs,
        checkpoint_dir=pathlib.Path(workdir) if checkpoint or resume else None,
        resume=resume,
    )
    seconds = time.perf_counter() - started
    config["train_seconds"] = seconds
    title = f"{config['family']} on {used} (seed {config['seed']})"
    run_dir = write_run(
        workdir, model, state.params, config, history, title=title,
        preprocessing=dataset.preprocessing,
    )  # fmt: skip
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


def write_run(
    workdir, model, params, config: dict, history: dict, *, title: str = "", preprocessing=None
):
    """`fml.rundir.save_run` plus `curves.png` when the history has epochs; returns
    the directory."""
    run_dir = rundir.save_run(
        workdir,
        model=model,
        params=params,
        config=config,
        history=history,
        preprocessing=preprocessing,
    )
    if history.get("train_loss"):
        loss = default_loss(model.spec, config.get("task", "classification"))
        plots.learning_curves(history, run_dir / "curves.png", title=title, loss_name=loss)
    return run_dir


def evaluate_run(run_dir, dataset: str | None = None) -> dict:
    """Test metrics of a saved run, recomputed from its files alone.

    Args:
      run_dir: a directory written by `train_and_evaluate` (or `fml train`).
      dataset: evaluate on this data set's test split instead of the run's own.

    Returns:
      `{"loss": ..., "accuracy" | "r2": ...}`; on the run's own data set these equal
      the saved `history.json["test"]` exactly. The test split is preprocessed with
      the run's own saved statistics (`preprocessing.json`), not refitted ones.
    """
    model, params, config = rundir.load_run(run_dir)
    block = rundir.load_preprocessing(run_dir, config["input_shape"])
    name = dataset or config.get("dataset")
    if not isinstance(name, str):
        raise CheckpointError(
            f"{pathlib.Path(run_dir) / 'config.json'}: expected a 'dataset' name, got {name!r}; "
            "pass dataset= to evaluate on another data set"
        )
    data = data_lib.load(name, validation=config.get("validation", 0.0), standardize=False)
    if tuple(data.preprocessing["raw_shape"]) != tuple(block["raw_shape"]):
        raise ConfigError(
            f"run {run_dir} expects inputs of shape {tuple(config['input_shape'])} "
            f"(raw {tuple(block['raw_shape'])}), but {name!r} has {data.input_shape} "
            f"(raw {tuple(data.preprocessing['raw_shape'])})"
        )
    rest = preprocessing_lib.remaining(block, data.preprocessing)
    x_test = preprocessing_lib.apply(rest, data.x_test, where=f"{name} test split")
    return evaluate(model, params, x_test, data.y_test, task=data.task)
