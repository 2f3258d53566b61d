"""Export fml models to PyTorch (`.pt`, `.safetensors`), TensorFlow (SavedModel) and
ONNX, each proven numerically against fml's own forward pass.

`export(model, params, path, to=..., input_shape=...)` writes the artifact into a
temporary sibling of `path`, loads it back with the target framework, runs it on
a probe batch and compares with `model.apply` (in float32, at `highest` matmul
precision: `fml.export.reference`). Only if the max abs diff is within
tolerance is the artifact renamed into place; otherwise `ExportError` is raised
and nothing is left behind (an existing file at `path` is untouched).

Targets: "torch" (a `torch.save`d state dict, loadable with `weights_only=True`),
"safetensors" (the same state dict, with the fml spec and input shape in its
metadata), "pt2" (a standalone `torch.export` program, `fml.export.torch`),
"savedmodel" (`fml.export.tensorflow`, via jax2tf), "tflite" (that SavedModel
converted) and "onnx" (`fml.export.onnx`, via the torch module). The torch,
TensorFlow and ONNX packages are imported only when their target is used.

Preprocessing: with `preprocessing=` (a run's block, `fml.preprocessing`), the
programs ("pt2", "savedmodel", "tflite", "onnx") apply it inside their graph and
take raw inputs `[B, *raw_shape]`; the state dicts ("torch", "safetensors") hold
the model only. Either way the block is written beside the artifact as
`preprocessing.json`, and the probe batch is raw, so the check covers the steps.

Example:
  >>> import jax, fml
  >>> from fml.export import export
  >>> model = fml.models.mlp([16, 3])
  >>> params = model.init(jax.random.key(0), (8,))
  >>> result = export(model, params, "/tmp/mlp.safetensors", to="safetensors", input_shape=(8,))
  >>> result.max_abs_diff < 1e-5
  True
"""

import contextlib
import importlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from fml import preprocessing as preprocessing_lib
from fml._model import Model
from fml.errors import ExportError, FmlError, unknown
from fml.export.reference import float32_model, reference
from fml.lock import run_lock
from fml.rundir import atomic_write


class Target(NamedTuple):
    """An export target: `write(model, params, input_shape, path, **options)` and
    `run(model, input_shape, path, x) -> y` live in `module`; `tolerance` is relative
    to the output scale."""

    module: str
    write: str
    run: str
    filename: str
    tolerance: float


TARGETS = {
    "torch": Target("fml.export.torch", "write_pt", "run_file", "model.pt", 1e-4),
    "safetensors": Target(
        "fml.export.torch", "write_safetensors", "run_file", "model.safetensors", 1e-4
    ),
    "pt2": Target("fml.export.torch", "write_program", "run_program", "model.pt2", 1e-4),
    "savedmodel": Target(
        "fml.export.tensorflow", "write_saved_model", "run_saved_model", "saved_model", 1e-4
    ),
    "tflite": Target("fml.export.tensorflow", "write_tflite", "run_tflite", "model.tflite", 1e-4),
    "onnx": Target("fml.export.onnx", "write_onnx", "run_onnx", "model.onnx", 1e-3),
}
# The targets whose graph applies the preprocessing block (the others hold the model only).
PROGRAMS = ("pt2", "savedmodel", "tflite", "onnx")
PREPROCESSING_FILE = "preprocessing.json"


class Exported(NamedTuple):
    """What `export` wrote and how close it came to fml on the probe batch."""

    target: str
    path: pathlib.Path
    max_abs_diff: float
    tolerance: float


def probe_batch(input_shape, batch: int = 4, seed: int = 0) -> np.ndarray:
    """A fixed standard-normal float32 batch `[batch, *input_shape]` to compare outputs on."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *tuple(input_shape))).astype(np.float32)


def max_abs_diff(got, want) -> float:
    """Max |got - want| in float64; raises `ExportError` when the shapes differ."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ExportError(f"exported model gave outputs of shape {got.shape}, fml {want.shape}")
    return float(np.max(np.abs(got - want), initial=0.0))


def _target_function(target: Target, name: str):
    return getattr(importlib.import_module(target.module), name)


def export(
    model: Model,
    params,
    path,
    *,
    to: str,
    input_shape,
    tolerance: float | None = None,
    preprocessing: dict | None = None,
    **options,
) -> Exported:
    """Exports `model` with `params` to `path` in format `to`, verified on a probe batch.

    Args:
      model: any fml model.
      params: its params.
      path: the file (or SavedModel directory) to write; replaced only on success.
      to: one of `TARGETS`: "torch", "safetensors", "savedmodel", "onnx".
      input_shape: the input shape without batch, as given to `model.init`.
      tolerance: max abs diff allowed against `model.apply`; default is the
        target's relative tolerance (1e-4, ONNX 1e-3) times `max(1, max |y|)`.
      preprocessing: the block of raw-input steps (`fml.preprocessing`, e.g.
        `fml.load(run).preprocessing`) whose output shape is `input_shape`; see above.
      **options: passed to the target's writer (e.g. `platforms` for "savedmodel").

    A model with a reduced compute dtype is exported in float32 (its params are).

    Returns:
      `Exported(target, path, max_abs_diff, tolerance)`.

    Raises:
      ExportError: the model cannot be expressed in the target, or the exported
        model's outputs differ from fml's by more than `tolerance`.
    """
    if to not in TARGETS:
        raise unknown("export target", to, TARGETS)
    target = TARGETS[to]
    path = pathlib.Path(path)
    block = preprocessing_lib.check(preprocessing or preprocessing_lib.identity(input_shape))
    if tuple(block["input_shape"]) != tuple(input_shape):
        raise ExportError(
            f"preprocessing gives inputs of shape {tuple(block['input_shape'])}, but the "
            f"model takes {tuple(input_shape)}"
        )
    if not preprocessing_lib.is_identity(block):
        options["preprocessing"] = block
    x = preprocessing_lib.invert(block, probe_batch(input_shape))  # raw inputs
    want = np.asarray(reference(model)(params, preprocessing_lib.apply(block, x)))
    model = float32_model(model)
    if tolerance is None:
        tolerance = target.tolerance * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    with run_lock(path.parent), _staged(path) as staged:
        _write(target, to, model, params, tuple(input_shape), staged, options)
        run_options = {"preprocessing": block} if "preprocessing" in options else {}
        got = _target_function(target, target.run)(
            model, tuple(input_shape), staged, x, **run_options
        )
        diff = max_abs_diff(got, want)
        if not diff <= tolerance:
            raise ExportError(
                f"{to} export of {model.family} does not reproduce fml: max abs diff "
                f"{diff:.3g} on a probe batch exceeds tolerance {tolerance:.3g}; "
                f"nothing was written to {path}"
            )
    if preprocessing is not None:
        write_preprocessing(path.parent, block)
    return Exported(to, path, diff, tolerance)


def write_preprocessing(directory, block: dict) -> pathlib.Path:
    """Writes `block` as `directory/preprocessing.json`, with a note of which files
    apply it themselves; returns the path."""
    note = (
        f"Raw inputs are float32 [N, *raw_shape]. The programs ({', '.join(PROGRAMS)}: "
        f"{', '.join(TARGETS[t].filename for t in PROGRAMS)}) apply these steps "
        "inside their graph: feed them raw inputs. The state dicts (model.pt, "
        "model.safetensors) hold the model only: apply the steps, in order, first."
    )
    path = pathlib.Path(directory) / PREPROCESSING_FILE
    text = json.dumps({**block, "note": note}, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode())
    return path


def _write(target: Target, to: str, model, params, input_shape, staged, options) -> None:
    """The target's writer; a failure to write (disk full, unwritable) is an `ExportError`."""
    try:
        _target_function(target, target.write)(model, params, input_shape, staged, **options)
    except FmlError:
        raise
    except Exception as e:  # torch, TF and safetensors each raise their own types
        raise ExportError(
            f"could not write the {to} export to {staged}: {type(e).__name__}: {e}"
        ) from e


STAGE = ".{name}.export-"  # the staging directories of an export to `name`
PREVIOUS = "previous"  # inside one: the directory the export replaced


@contextlib.contextmanager
def _staged(path: pathlib.Path):
    """Yields a temporary path next to `path`; moves it onto `path` if the block succeeds.

    Before anything else it finishes (or undoes) any export to `path` that was killed
    mid-way and removes its staging directories (`recover`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        stage = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=STAGE.format(name=path.name)))
    except OSError as e:
        raise ExportError(f"cannot write an export to {path}: {e}") from e
    try:
        yield stage / path.name
        (stage / "verified").touch()  # from here on the new copy may replace the old one
        _move_into_place(stage / path.name, path, stage / PREVIOUS)
    except FmlError:
        raise
    except OSError as e:
        raise ExportError(f"could not move the export into place at {path}: {e}") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recover(path) -> None:
    """Finishes or undoes an export to `path` that was killed, and removes its staging.

    A staging directory holds the new export (`path.name`), a `verified` mark once
    it reproduced fml, and `previous` once the old directory was moved aside. If
    the kill came between the two renames (`path` missing), the verified new copy
    is moved into place, or else the previous one is put back; every staging
    directory is then removed.
    """
    path = pathlib.Path(path)
    for stage in sorted(path.parent.glob(STAGE.format(name=path.name) + "*")):
        if not stage.is_dir() or stage.is_symlink():
            continue
        if not path.exists():
            new, previous = stage / path.name, stage / PREVIOUS
            if (stage / "verified").exists() and new.exists():
                os.replace(new, path)
            elif previous.exists():
                os.replace(previous, path)
        shutil.rmtree(stage, ignore_errors=True)


def _move_into_place(new: pathlib.Path, path: pathlib.Path, backup: pathlib.Path) -> None:
    """Renames `new` to `path`; a directory already at `path` goes to `backup` first and
    comes back if the rename fails (a kill in between is repaired by `recover`)."""
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(new, path)
        return
    os.replace(path, backup)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(backup, path)
        raise


__all__ = [
    "PROGRAMS",
    "TARGETS",
    "Exported",
    "Target",
    "export",
    "max_abs_diff",
    "probe_batch",
    "recover",
    "write_preprocessing",
]
