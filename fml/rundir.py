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
import math
import os
import pathlib
import shutil
import tempfile
import zipfile

import jax
import numpy as np

from fml import models
from fml import preprocessing as preprocessing_lib
from fml.errors import CheckpointError, ConfigError, FmlError
from fml.lock import LOCK_FILE, run_lock

SEPARATOR = "/"
PREPROCESSING = "preprocessing.json"
# What marks a directory as holding a run (any trainer's or sweep's output).
RUN_MARKERS = ("config.json", "spec.json", "params.npz", "history.json", "checkpoints")
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same directory and a rename.

    Raises:
      CheckpointError: the write failed (disk full, unwritable); `path` is untouched.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path} (it is untouched): {e}") from e
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


def npz_header(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{name: (shape, dtype)}` of an `.npz`, read from its members' `.npy` headers
    alone (no array data is read or decompressed beyond the headers).

    Raises:
      CheckpointError: the file is missing, not a zip of `.npy` members, a member
        holds an object, string or complex array, or is shorter than its header says.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return {
                info.filename.removesuffix(".npy"): _member_header(archive, info, path)
                for info in archive.infolist()
            }
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"no params file at {path}") from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
        raise CheckpointError(f"params file {path} is corrupt or truncated: {e}") from e


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path):
    """`(shape, dtype)` of one `.npy` member, checked against the member's size."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise CheckpointError(f"params file {path}: {info.filename} has .npy version {version}")
        shape, _, dtype = _HEADER_READERS[version](f)
        header_bytes = f.tell()
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise CheckpointError(
            f"params file {path}: {info.filename} has dtype {dtype}; expected real numbers"
        )
    expected_size = header_bytes + math.prod(shape) * dtype.itemsize
    if info.file_size != expected_size:
        raise CheckpointError(
            f"params file {path}: {info.filename} declares shape {shape} of {dtype} "
            f"({expected_size} bytes with its header), but the member holds {info.file_size}"
        )
    return tuple(shape), dtype


def load_params(path, *, expected: dict | None = None) -> dict:
    """Params from an `.npz` written by `save_params` (no pickles are loaded).

    Args:
      path: the `.npz`.
      expected: `{"a/b": (shape, dtype)}` the file must hold exactly; checked from
        the headers before any array is read, so a file that declares huge arrays
        costs no memory.

    Raises:
      CheckpointError: the file is missing, corrupt, or does not match `expected`.
    """
    header = npz_header(path)
    if expected is not None:
        got = {k: (shape, np.dtype(dtype).name) for k, (shape, dtype) in header.items()}
        want = {k: (tuple(shape), np.dtype(dtype).name) for k, (shape, dtype) in expected.items()}
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if wrong:
            described = "; ".join(
                f"{k}: expected {want.get(k, 'nothing')}, got {got.get(k, 'nothing')}"
                for k in wrong[:4]
            )
            raise CheckpointError(f"params in {path} do not match the model spec: {described}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return unflatten_params({k: f[k] for k in f.files})
    except FileNotFoundError as e:
        raise CheckpointError(f"no params file at {path}") from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"params file {path} is corrupt or truncated: {e}") from e


def _write_json(path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True, default=float) + "\n").encode())


def read_json_dict(path) -> dict:
    """A JSON object from `path`.

    Raises:
      CheckpointError: the file is missing, unreadable, not UTF-8, not JSON, nested
        too deeply, or not an object; the message names the file.
    """
    path = pathlib.Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path.name} in run directory {path.parent}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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
            _clear(run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _clear(run_dir: pathlib.Path) -> None:
    """Deletes everything in `run_dir` but its lock file (held by the writer clearing it)."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


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
        return preprocessing_lib.check(read_json_dict(path))
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

    Raises:
      CheckpointError: a file cannot be written (disk full, unwritable), or another
        process is writing the directory (`fml.lock`).
    """
    run_dir = pathlib.Path(run_dir)
    if jax.process_index() != 0:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        if preprocessing is not None:
            save_preprocessing(run_dir, preprocessing)
        _write_json(run_dir / "spec.json", model.spec)
        _write_json(run_dir / "config.json", config)
        save_params(run_dir / "params.npz", params)
        if history is not None:
            _write_json(run_dir / "history.json", dict(history))
            atomic_write(run_dir / "history.csv", history_csv(history).encode())
    return run_dir


def check_input_shape(config: dict, where) -> tuple[int, ...]:
    """`config["input_shape"]` as a tuple of positive ints, else `CheckpointError`."""
    shape = config.get("input_shape")
    if not (
        isinstance(shape, list)
        and shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise CheckpointError(
            f"{where}: expected an 'input_shape' list of positive ints, got {shape!r}"
        )
    return tuple(shape)


def expected_params(model, input_shape) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{"a/b": (shape, dtype)}` of the params `model.init` makes for `input_shape`."""
    abstract = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {
        SEPARATOR.join(str(k.key) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in leaves
    }


def load_run(run_dir):
    """`(model, params, config)` from a run directory, with no user code.

    Raises:
      CheckpointError: a file is missing or malformed, or the params do not match
        the spec (checked from the `.npz` headers before any array is read).
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    spec = read_json_dict(run_dir / "spec.json")
    config = read_json_dict(run_dir / "config.json")
    try:
        model = models.from_spec(spec)
    except FmlError as e:
        raise CheckpointError(f"{run_dir / 'spec.json'}: {e}") from e
    input_shape = check_input_shape(config, run_dir / "config.json")
    try:
        expected = expected_params(model, input_shape)
    except (FmlError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{run_dir}: the model of spec.json cannot take config.json's input_shape "
            f"{list(input_shape)}: {e}"
        ) from e
    params = load_params(run_dir / "params.npz", expected=expected)
    return model, jax.tree.map(jax.numpy.asarray, params), config
