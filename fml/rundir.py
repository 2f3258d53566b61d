"""The run directory every trainer writes and every reader (eval, export,
restore) reads. Layout:

  RUN_DIR/
    config.json    how the run was made: family, dataset, input_shape, task,
                   optimizer, learning_rate, epochs, batch_size, seed, ...
    spec.json      the model spec (`fml.models.from_spec` rebuilds the model)
    preprocessing.json  what was done to raw inputs before the model saw them
                   (`fml.preprocessing`; written before training starts)
    params.npz     final params, nested keys joined with "/" ("dense_0/w")
    history.json   per-epoch metrics (and "test" at the end)
    history.csv    the per-epoch metrics as a table
    curves.png     learning curves (written by `fml.plots`, when available)
    checkpoints/   `fit(..., checkpoint_dir=RUN_DIR)`'s checkpoints, one folder per
                   step (`fml.checkpoint`)

Every file is written to a temporary name and renamed into place, so a crash
never leaves a half-written file where a good one was. `prepare` is the one policy
for a directory that already holds a run: refuse, unless resuming or overwriting.
"""

import csv
import io
import json
import os
import pathlib
import shutil
import tempfile
import zipfile

import jax
import numpy as np

from fml import models
from fml import preprocessing as preprocessing_lib
from fml.errors import CheckpointError, ConfigError

SEPARATOR = "/"
PREPROCESSING = "preprocessing.json"
# What marks a directory as holding a run (any trainer's or sweep's output).
RUN_MARKERS = ("config.json", "spec.json", "params.npz", "history.json", "checkpoints")


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same directory and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def flatten_params(params, prefix: str = "") -> dict[str, np.ndarray]:
    """`{"a": {"b": x}}` -> `{"a/b": x}` as numpy arrays."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{SEPARATOR}{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = np.asarray(jax.device_get(value))
    return flat


def unflatten_params(flat: dict) -> dict:
    """The inverse of `flatten_params`."""
    params: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(SEPARATOR)
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params


def save_params(path, params) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **flatten_params(params))
    atomic_write(path, buffer.getvalue())


def load_params(path) -> dict:
    """Params from an `.npz` written by `save_params` (no pickles are loaded)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return unflatten_params({k: f[k] for k in f.files})
    except FileNotFoundError as e:
        raise CheckpointError(f"no params file at {path}") from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"params file {path} is corrupt or truncated: {e}") from e


def _write_json(path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True, default=float) + "\n").encode())


def _read_json(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"missing {pathlib.Path(path).name} in run directory {path.parent}"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def history_csv(history: dict) -> str:
    """The per-epoch lists of `history` as CSV (one row per epoch)."""
    columns = [k for k, v in history.items() if isinstance(v, list)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in zip(*(history[c] for c in columns)):
        writer.writerow(row)
    return out.getvalue()


def holds_run(run_dir) -> bool:
    """Whether `run_dir` holds any file a run writes."""
    run_dir = pathlib.Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def prepare(run_dir, *, resume: bool = False, overwrite: bool = False) -> pathlib.Path:
    """The policy for a run directory, applied before any training starts.

    A directory that holds no run is used as it is. One that holds a run is
    refused (`ConfigError` naming `--resume` / `--overwrite`, the `fml` flags, and
    `resume=True` / `overwrite=True`, the Python arguments), unless `resume`
    (continue it: its files stay) or `overwrite` (it is deleted now, whole, so no
    file of the old run, e.g. a stale `export/`, survives).

    Returns:
      the directory, created.
    """
    run_dir = pathlib.Path(run_dir)
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite (resume= or overwrite=), not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a directory")
    if holds_run(run_dir) and not resume:
        if not overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds a run; pass --resume to continue it "
                f"or --overwrite to replace it (in Python: resume=True or overwrite=True), "
                f"or choose another --out"
            )
        if jax.process_index() == 0:
            shutil.rmtree(run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_preprocessing(run_dir, block: dict) -> None:
    """Writes `block` (`fml.preprocessing`) as `run_dir/preprocessing.json`."""
    if jax.process_index() == 0:
        _write_json(pathlib.Path(run_dir) / PREPROCESSING, preprocessing_lib.check(block))


def load_preprocessing(run_dir, input_shape=None) -> dict:
    """The run's preprocessing block; a run written without one (older fml, or
    arrays passed as the model takes them) gets the identity on `input_shape`."""
    path = pathlib.Path(run_dir) / PREPROCESSING
    if not path.exists():
        if input_shape is None:
            raise CheckpointError(f"missing {PREPROCESSING} in run directory {run_dir}")
        return preprocessing_lib.identity(input_shape)
    try:
        return preprocessing_lib.check(_read_json(path))
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a preprocessing block: {e}") from e


def save_run(
    run_dir,
    *,
    model,
    params,
    config: dict,
    history: dict | None = None,
    preprocessing: dict | None = None,
) -> pathlib.Path:
    """Writes a run directory (see the module docstring); returns its path.

    In a multi-process run only process 0 writes; the others return the path.
    """
    run_dir = pathlib.Path(run_dir)
    if jax.process_index() != 0:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if preprocessing is not None:
        save_preprocessing(run_dir, preprocessing)
    _write_json(run_dir / "spec.json", model.spec)
    _write_json(run_dir / "config.json", config)
    save_params(run_dir / "params.npz", params)
    if history is not None:
        _write_json(run_dir / "history.json", dict(history))
        atomic_write(run_dir / "history.csv", history_csv(history).encode())
    return run_dir


def load_run(run_dir):
    """`(model, params, config)` from a run directory, with no user code."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    spec = _read_json(run_dir / "spec.json")
    config = _read_json(run_dir / "config.json")
    model = models.from_spec(spec)
    params = load_params(run_dir / "params.npz")
    if not isinstance(config.get("input_shape"), list):
        raise CheckpointError(
            f"{run_dir / 'config.json'}: expected an 'input_shape' list, got "
            f"{config.get('input_shape')!r}"
        )
    input_shape = tuple(config["input_shape"])
    expected = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.key(0))
    got = jax.tree.map(np.shape, params)
    if jax.tree.map(lambda s: tuple(s.shape), expected) != got:
        raise CheckpointError(
            f"params in {run_dir} do not match the model spec: expected shapes "
            f"{jax.tree.map(lambda s: tuple(s.shape), expected)}, got {got}"
        )
    return model, jax.tree.map(jax.numpy.asarray, params), config
