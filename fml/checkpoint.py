"""Checkpoints of a whole training run, with orbax-checkpoint.

A checkpoint holds everything a run needs to continue exactly where it was:
the `TrainState` (params, optimizer state, step, PRNG key, hparams), the model
spec, the run's config and its data position. Batches are a pure function of
`(seed, epoch)` (`fml.batching`), so the position is the epoch and the step
within it, both read off `state.step`. Layout, inside a run directory:

  RUN_DIR/checkpoints/<step>/
    state/   the state's arrays (orbax PyTree: params, opt_state, step,
             key data, hparams; and the best params when early stopping)
    meta/    JSON: spec, config, position, history so far, the current
             epoch's per-step metrics, key implementation, the SHA-256 of the
             arrays ("arrays_sha256"), and a SHA-256 of all the rest ("sha256"),
             so a changed byte of either is refused on restore

orbax writes each step to a temporary directory and renames it into place, so
a run killed mid-save leaves the previous checkpoint valid; the last `keep`
steps are kept. Arrays are fetched to the host before saving, so states that
are replicated or sharded over local devices save the same way (restore gives
host-backed arrays; `jax.device_put` them onto a mesh to shard them again).

Example:
  >>> import tempfile, fml
  >>> run_dir = tempfile.mkdtemp()
  >>> data = fml.data.load("iris")  # 120 training examples: 4 batches of 32
  >>> _ = fml.fit(fml.models.mlp([16, 3]), data, epochs=2, quiet=True, checkpoint_dir=run_dir)
  >>> model, state = fml.checkpoint.restore(run_dir)
  >>> int(state.step)
  8
"""

import hashlib
import json
import numbers
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np

from fml import models
from fml._model import Model, canonical_spec
from fml.errors import CheckpointError, FmlError, TrainingError
from fml.step import (
    FULL_BATCH_OPTIMIZERS,
    OPTIMIZERS,
    CosineSchedule,
    TrainState,
    init_state,
    make_optimizer,
    schedule_from_json,
)

CHECKPOINTS = "checkpoints"
# 1: "sha256" covers the arrays only; 2: "sha256" covers the metadata, whose
# "arrays_sha256" covers the arrays.
FORMAT = 2
FORMATS = (1, 2)
# The config entries that decide a run's trajectory: a resume must not change them.
TRAJECTORY = (
    "optimizer",
    "learning_rate",
    "optimizer_kwargs",
    "clip_norm",
    "batch_size",
    "drop_remainder",
    "shuffle",
    "seed",
    "loss",
    "l2",
    "l1",
    "tol",
    "task",
    "input_shape",
    "num_examples",
    "data_sha256",
)


class Restored(NamedTuple):
    """A checkpoint read back: the model, its state, and the run's metadata.

    Attributes:
      model: rebuilt from the saved spec.
      state: the `TrainState`, arrays on the default device.
      step: the checkpoint's step.
      meta: the saved JSON (spec, config, position, history, ...).
      best_params: the best validation epoch's params (early stopping), or None.
    """

    model: Model
    state: TrainState
    step: int
    meta: dict
    best_params: Any


# ------------------------------------------------------------------ config


def _jsonable(value):
    """`value` if it survives a JSON round trip unchanged (a schedule of fml's as
    its `to_json`), else a `"<custom ...>"` tag."""
    if isinstance(value, CosineSchedule):
        return value.to_json()
    try:
        if json.loads(json.dumps(value)) == value:
            return value
    except (TypeError, ValueError):
        pass
    name = getattr(value, "__name__", type(value).__name__)
    return f"<custom {name}>"


def data_sha256(x, y) -> str:
    """SHA-256 of the training arrays (shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def fit_config(x, y, *, num_examples: int | None = None, **options) -> dict:
    """The JSON config a checkpoint records for a `fit` call on `(x, y)`.

    `num_examples` is the data's size when `(x, y)` is a sample of it (a stream).
    `options` are `fit`'s keyword arguments that shape the run; values that are
    not JSON (a custom optax optimizer, a schedule, a loss function) are kept
    as `"<custom name>"` tags, and `restore` then asks for the optimizer.
    """
    return {
        **{k: _jsonable(v) for k, v in options.items()},
        "input_shape": list(x.shape[1:]),
        "num_examples": int(x.shape[0] if num_examples is None else num_examples),
        "data_sha256": data_sha256(x, y),
    }


def optimizer_from_config(config: dict):
    """The optax optimizer a run was made with, rebuilt from its config."""
    name, learning_rate = config.get("optimizer"), config.get("learning_rate")
    kwargs = config.get("optimizer_kwargs") or {}
    if isinstance(learning_rate, dict):
        try:
            learning_rate = schedule_from_json(learning_rate)
        except FmlError as e:
            raise CheckpointError(f"the run's learning_rate: {e}") from None
    rebuildable = (
        name in OPTIMIZERS
        and isinstance(learning_rate, int | float | CosineSchedule)
        or name in FULL_BATCH_OPTIMIZERS
    ) and isinstance(kwargs, dict)
    if not rebuildable:
        raise CheckpointError(
            f"the run was made with optimizer {name!r}, learning_rate {learning_rate!r} and "
            f"optimizer_kwargs {kwargs!r}, which cannot be rebuilt from JSON; pass the same "
            "optimizer= to restore"
        )
    return make_optimizer(name, learning_rate, clip_norm=config.get("clip_norm"), **kwargs)


# ------------------------------------------------------------------ trees


def _state_tree(state: TrainState, best_params=None) -> dict:
    """The saved pytree: the state with its typed key as raw key data."""
    tree = {**state._asdict(), "key": jax.random.key_data(state.key)}
    if best_params is not None:
        tree["best_params"] = best_params
    return tree


def _path_name(path) -> str:
    """`('opt_state', 1, 'count')`-style key path -> `"opt_state/1/count"`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _leaf_table(tree) -> dict:
    """`{path: (shape, dtype)}` of a tree of arrays, abstract arrays or orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for p, leaf in leaves}


def tree_sha256(tree) -> str:
    """SHA-256 over a tree's leaves: paths, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(leaf)
        digest.update(f"{_path_name(path)}{a.shape}{a.dtype}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def meta_sha256(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata: its sorted JSON without the "sha256" entry."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _json_number(value):
    """numpy scalars and arrays in metadata as plain JSON numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_metric(value) -> bool:
    """A history entry: a number, a list of numbers, or a dict of numbers."""
    if isinstance(value, list):
        return all(_is_number(v) for v in value)
    if isinstance(value, dict):
        return all(_is_number(v) for v in value.values())
    return _is_number(value)


# The metadata entries a restore or resume reads, and what each must be.
META_FIELDS = {
    "spec": (lambda v: isinstance(v, dict), "a model spec object"),
    "config": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("input_shape"), list)
            and all(_is_int(d) and d > 0 for d in v["input_shape"])
        ),
        "a config object with an 'input_shape' list of positive ints",
    ),
    "sha256": (lambda v: isinstance(v, str), "a hex digest"),
    "format": (lambda v: _is_int(v) and v in FORMATS, f"one of {list(FORMATS)}"),
    "arrays_sha256": (lambda v: isinstance(v, str), "a hex digest"),
    "step": (lambda v: _is_int(v) and v >= 0, "a step count"),
    "key_impl": (lambda v: isinstance(v, str), "a PRNG implementation name"),
    "has_best_params": (lambda v: isinstance(v, bool), "true or false"),
    "history": (
        lambda v: isinstance(v, dict) and all(_is_metric(m) for m in v.values()),
        "an object of per-epoch metric lists",
    ),
    "epoch_metrics": (
        lambda v: (
            v is None
            or isinstance(v, dict)
            and all(isinstance(m, list) and all(_is_number(x) for x in m) for m in v.values())
            and len({len(m) for m in v.values()}) <= 1
        ),
        "an object of equally long per-step metric lists",
    ),
    "best": (
        lambda v: (
            v is None
            or isinstance(v, dict)
            and set(v) == {"loss", "epoch"}
            and _is_number(v["loss"])
            and _is_int(v["epoch"])
        ),
        'null or {"loss": number, "epoch": int}',
    ),
    "stopped": (lambda v: isinstance(v, bool), "true or false"),
    "callbacks": (
        lambda v: isinstance(v, dict) and all(isinstance(c, dict) for c in v.values()),
        "an object of the callbacks' state objects",
    ),
    "loop": (
        lambda v: isinstance(v, dict) and META_FIELDS["epoch_metrics"][0](v.get("epoch_metrics")),
        'an object {"epoch_metrics": equally long per-step metric lists}',
    ),
}
REQUIRED_META = ("spec", "config", "sha256")


def check_meta(meta, where: str) -> dict:
    """`meta` if its entries are well formed and (format 2) match its SHA-256.

    Raises:
      CheckpointError: an entry is missing or of the wrong type, or the metadata
        was changed after it was saved; the message names the entry.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: expected a metadata object, got {type(meta).__name__}")
    required = (*REQUIRED_META, "arrays_sha256") if meta.get("format") == 2 else REQUIRED_META
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: metadata is incomplete: no {', '.join(missing)}")
    checksum_first = ("format", "sha256")  # then a changed entry is named as such
    for name in (*checksum_first, *(n for n in META_FIELDS if n not in checksum_first)):
        ok, what = META_FIELDS[name]
        if name in meta and not ok(meta[name]):
            raise CheckpointError(
                f"{where}: metadata entry {name!r} should be {what}, got {meta[name]!r:.200}"
            )
        if name == "sha256" and meta.get("format") == 2 and meta_sha256(meta) != meta["sha256"]:
            raise CheckpointError(
                f"{where}: its metadata does not match its SHA-256 (it was changed after saving)"
            )
    return meta


def _mismatches(expected: dict, got: dict) -> list[str]:
    """The paths whose (shape, dtype) differ, params first."""
    paths = [p for p in sorted(set(expected) | set(got)) if expected.get(p) != got.get(p)]
    return sorted(paths, key=lambda p: not p.startswith("params/"))


def _describe(paths: list[str], expected: dict, got: dict, limit: int = 4) -> str:
    lines = [
        f"{p}: expected {expected.get(p, 'nothing')}, got {got.get(p, 'nothing')}"
        for p in paths[:limit]
    ]
    return "; ".join(lines + ([f"... {len(paths) - limit} more"] if len(paths) > limit else []))


def _all_finite(tree) -> bool:
    return all(
        np.isfinite(leaf).all()
        for leaf in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
    )


# ------------------------------------------------------------------ checkpointer


class Checkpointer:
    """The checkpoints of one run directory (`RUN_DIR/checkpoints/<step>/`).

    Args:
      run_dir: the run directory; created (when writing) if it does not exist.
      keep: how many of the latest checkpoints to keep (None: all).
      read_only: open for restoring only; nothing is created or cleaned.

    Raises:
      CheckpointError: the directory cannot be created or written.
    """

    def __init__(self, run_dir, *, keep: int | None = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.run_dir = pathlib.Path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise CheckpointError(f"expected keep to be a positive int or None, got {keep!r}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=False,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        try:
            if not read_only:
                _check_writable(self.directory)
            self._manager = ocp.CheckpointManager(
                self.directory.absolute(),
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: {e}") from e

    def steps(self) -> list[int]:
        """The steps saved here, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def describe_latest(self) -> str:
        """Names the last checkpoint, for error messages."""
        step = self.latest_step()
        if step is None:
            return f"no checkpoint was saved yet in {self.directory}"
        return f"the last good checkpoint is step {step} in {self.directory / str(step)}"

    def save(self, state: TrainState, meta: dict, *, best_params=None) -> None:
        """Saves `state` and `meta` as checkpoint `state.step` (a no-op if it exists).

        Raises:
          TrainingError: the params are not finite (nothing is saved).
          CheckpointError: the write failed (disk full, unwritable); the
            previous checkpoints stay as they were.
        """
        step = int(state.step)
        if step in self.steps():
            return
        tree = jax.device_get(_state_tree(state, best_params))
        if not _all_finite(tree["params"]):
            raise TrainingError(
                f"params became NaN or inf by step {step}; not saving them "
                f"({self.describe_latest()})"
            )
        meta = {
            **meta,
            "format": FORMAT,
            "step": step,
            "key_impl": str(jax.random.key_impl(state.key)),
            "has_best_params": best_params is not None,
            "arrays_sha256": tree_sha256(tree),
        }
        meta = json.loads(json.dumps(meta, default=_json_number))  # as restore will read it
        meta["sha256"] = meta_sha256(meta)
        args = self._ocp.args
        try:
            self._manager.save(
                step,
                args=args.Composite(state=args.StandardSave(tree), meta=args.JsonSave(meta)),
            )
        except Exception as e:
            raise CheckpointError(
                f"could not save checkpoint step {step} in {self.directory}: "
                f"{type(e).__name__}: {e}; {self.describe_latest()}, untouched"
            ) from e

    def start(self, model: Model, optimizer, config: dict, *, resume: bool) -> Restored | None:
        """Where a `fit` run begins: the latest checkpoint when resuming (None if
        there is none yet); a new run refuses a directory that holds checkpoints,
        so nothing saved is overwritten."""
        step = self.latest_step()
        if step is None:
            return None
        if not resume:
            raise CheckpointError(
                f"{self.directory} already holds checkpoints (latest step {step}); pass "
                "resume=True to continue that run, or use another checkpoint_dir"
            )
        check_resumable(self.read_meta(step), model, config, self.directory)
        return self.restore(step, optimizer=optimizer, model=model)

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step`."""
        try:
            meta = self._manager.restore(
                step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:
            raise self._corrupt(step, e) from e
        return check_meta(meta, f"checkpoint step {step} in {self.directory}")

    def restore(self, step: int | None = None, *, optimizer=None, model=None) -> Restored:
        """Reads checkpoint `step` (default: the latest) back.

        Args:
          step: which checkpoint.
          optimizer: the optax optimizer of the run; rebuilt from the saved
            config when None (which needs a named optimizer and a float
            learning rate).
          model: the run's model, whose spec must be the saved one; rebuilt from
            the spec when None (a Flax module only where its class is importable).

        Raises:
          CheckpointError: no checkpoint, or it is corrupt, truncated, or its
            arrays do not match its model spec and optimizer.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step is None:
            step = steps[-1]
        elif isinstance(step, numbers.Integral) and not isinstance(step, bool) and step in steps:
            step = int(step)
        else:
            raise CheckpointError(f"no checkpoint step {step!r} in {self.directory}; have {steps}")
        meta = self.read_meta(step)
        try:
            model = _model_of(meta["spec"], model)
            tx = optimizer if optimizer is not None else optimizer_from_config(meta["config"])
            abstract = _abstract_tree(model, tx, meta)
        except FmlError as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: {e}") from e
        self._check_layout(step, abstract, meta)
        try:
            tree = self._manager.restore(
                step,
                args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract)),
            )["state"]
        except Exception as e:
            raise self._corrupt(step, e) from e
        arrays_sha256 = meta["arrays_sha256"] if meta.get("format") == 2 else meta["sha256"]
        if tree_sha256(tree) != arrays_sha256:
            raise self._corrupt(step, ValueError("its arrays do not match their SHA-256"))
        best_params = tree.pop("best_params", None)
        impl = meta.get("key_impl", "threefry2x32")
        try:
            key = jax.random.wrap_key_data(tree.pop("key"), impl=impl)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: its key data does not fit "
                f"key_impl {impl!r}: {e}"
            ) from e
        state = TrainState(**jax.device_put(tree), key=key)
        return Restored(model, state, step, meta, best_params)

    def _check_layout(self, step: int, abstract, meta: dict) -> None:
        """Raises unless the saved arrays have the shapes and dtypes the spec implies."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            got = _leaf_table(saved.tree)
        except Exception as e:
            raise self._corrupt(step, e) from e
        expected = _leaf_table(abstract)
        wrong = _mismatches(expected, got)
        if wrong:
            what = "params" if wrong[0].startswith("params/") else "arrays"
            raise CheckpointError(
                f"the {what} of checkpoint step {step} in {self.directory} do not match its "
                f"model spec {meta['spec']} and optimizer: {_describe(wrong, expected, got)}"
            )

    def _corrupt(self, step: int, error: Exception) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupt or truncated "
            f"({type(error).__name__}: {str(error)[:300]}); other checkpoints: {others} "
            "(pass step= to restore one)"
        )

    def close(self) -> None:
        self._manager.close()


def _model_of(spec: dict, model: Model | None) -> Model:
    """The saved spec's model: `model` when given (its spec must be the saved one)."""
    if model is None:
        return models.from_spec(spec)
    if not isinstance(model, Model) or canonical_spec(model.spec) != canonical_spec(spec):
        got = canonical_spec(model.spec) if isinstance(model, Model) else type(model).__name__
        raise CheckpointError(f"expected model= with the saved spec {spec}, got {got}")
    return model


def _check_writable(directory: pathlib.Path) -> None:
    """Creates `directory` and proves it writable with a probe file (OSError if not)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".fml-write-probe"
    probe.write_bytes(b"")
    probe.unlink()


def _abstract_tree(model: Model, tx, meta: dict):
    """Shapes and dtypes of the saved tree, from the spec, optimizer and config."""
    config = meta["config"]
    input_shape = tuple(config["input_shape"])

    def tree():
        state = init_state(model, tx, input_shape, seed=0)
        best = state.params if meta.get("has_best_params") else None
        return _state_tree(state, best)

    return jax.eval_shape(tree)


# ------------------------------------------------------------------ public API


def restore(
    run_dir, *, step: int | None = None, optimizer=None, model: Model | None = None
) -> tuple[Model, TrainState]:
    """`(model, state)` from a run directory's checkpoint, with no user code.

    The spec rebuilds the model; the optimizer is rebuilt from the run's config
    (pass `optimizer=` when the run used a custom optax transformation).

    Args:
      run_dir: the run directory (`fit(..., checkpoint_dir=run_dir)`).
      step: which checkpoint (default: the latest).
      optimizer: the run's optax optimizer, if it cannot be rebuilt by name.
      model: the run's model (its spec must be the saved one), for a model the
        spec cannot rebuild, e.g. a Flax module defined in `__main__` or with
        non-JSON constructor arguments.

    Raises:
      CheckpointError: no checkpoint, or a corrupt or mismatched one.
    """
    checkpoints = Checkpointer(_existing(run_dir), read_only=True)
    try:
        restored = checkpoints.restore(step, optimizer=optimizer, model=model)
    finally:
        checkpoints.close()
    return restored.model, restored.state


def latest_step(run_dir) -> int | None:
    """The step of the latest checkpoint in `run_dir`, or None when there is none."""
    try:
        run_dir = _existing(run_dir)
    except CheckpointError:
        return None
    return Checkpointer(run_dir, read_only=True).latest_step()


def _existing(run_dir) -> pathlib.Path:
    """`run_dir` as a path, or `CheckpointError` unless it holds a checkpoints folder."""
    try:
        run_dir = pathlib.Path(run_dir)
        found = (run_dir / CHECKPOINTS).is_dir()
    except (TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"expected the path of a run directory, got {run_dir!r}: {e}") from e
    if not found:
        raise CheckpointError(f"no checkpoints in {run_dir} (expected {run_dir / CHECKPOINTS})")
    return run_dir


def check_resumable(meta: dict, model: Model, config: dict, directory) -> None:
    """Raises `CheckpointError` unless a run of `model` with `config` may continue `meta`'s."""
    if canonical_spec(meta["spec"]) != canonical_spec(model.spec):
        raise CheckpointError(
            f"{directory} holds checkpoints of a different model: {meta['spec']}, not "
            f"{canonical_spec(model.spec)}; use another checkpoint_dir"
        )
    saved = meta["config"]
    changed = [
        f"{k}: {saved.get(k)!r} -> {config.get(k)!r}"
        for k in TRAJECTORY
        if saved.get(k) != config.get(k)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume the run in {directory} with different settings or data ("
            + "; ".join(changed)
            + "); use the original ones or another checkpoint_dir"
        )
