"""Training: a pure `train_step(state, batch) -> (state, metrics)`, jitted once,
optionally scanned over a whole epoch of on-device data, and `fit` around it.

A batch is a dict `{"x": [B, ...], "y": [B, ...], "mask": [B]}`; the mask marks
real examples (padding of a last partial batch has mask 0 and contributes
nothing to the loss, gradients or metrics).
"""

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fml import data as data_lib
from fml import losses as losses_lib
from fml import metrics as metrics_lib
from fml import models as models_lib
from fml import proximal  # [accuracy]
from fml._model import Model
from fml.data import Dataset, check_arrays, check_labels
from fml.data._embedded import as_array
from fml.errors import ConfigError, ShapeError, TrainingError, in_range, unknown


class TrainState(NamedTuple):
    """Everything a training run carries from step to step.

    Attributes:
      params: the model's params.
      opt_state: the optax optimizer state (learning rate inside it, as data).
      step: int32 scalar, number of steps taken.
      key: PRNG key; step `s` uses `fold_in(key, s)` for dropout, so a restored
        state continues with exactly the randomness it would have had.
      hparams: per-run values the objective reads, as arrays (e.g. `{"l2": 0.0}`),
        so changing them never recompiles.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    hparams: dict


# ------------------------------------------------------------------ optimizers

OPTIMIZERS: dict[str, Callable] = {
    "sgd": optax.sgd,
    "momentum": functools.partial(optax.sgd, momentum=0.9),
    "nesterov": functools.partial(optax.sgd, momentum=0.9, nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}
FULL_BATCH_OPTIMIZERS = ("lbfgs",)


def make_optimizer(
    optimizer="adam", learning_rate=1e-3, *, clip_norm: float | None = None, **kwargs
) -> optax.GradientTransformationExtraArgs:
    """An optax optimizer by name, its learning rate held in the state as data.

    Args:
      optimizer: a name in `OPTIMIZERS` or "lbfgs" (full-batch, with line search),
        or an optax `GradientTransformation`, returned as is.
      learning_rate: a float or an optax schedule `step -> lr`. Ignored by lbfgs
        (its zoom line search picks the step).
      clip_norm: clip gradients to this global norm first.
      **kwargs: passed to the optax factory (e.g. `b1`, `weight_decay`).
    """
    named = isinstance(optimizer, str)
    if not callable(learning_rate):
        in_range(learning_rate, "learning_rate", 0.0, math.inf, closed="neither")
    try:
        if isinstance(optimizer, optax.GradientTransformation):
            tx = optimizer
        elif named and optimizer in FULL_BATCH_OPTIMIZERS:
            tx = optax.lbfgs(**kwargs)
        elif named and optimizer in OPTIMIZERS:
            factory = optax.inject_hyperparams(OPTIMIZERS[optimizer])
            tx = factory(learning_rate=learning_rate, **kwargs)
        else:
            raise unknown("optimizer", optimizer, [*OPTIMIZERS, *FULL_BATCH_OPTIMIZERS])
    except TypeError as e:
        raise ConfigError(f"optimizer {optimizer!r} does not take {kwargs}: {e}") from e
    if clip_norm is not None:
        clip_norm = in_range(clip_norm, "clip_norm", 0.0, math.inf, closed="neither")
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return optax.with_extra_args_support(tx)


# ------------------------------------------------------------------ objective


class Objective(NamedTuple):
    """What a step minimises: `mean(loss(apply(x), y))` over real examples
    plus `hparams["l2"] * l2_penalty(params)`."""

    loss: Callable
    classify: bool


def make_objective(model: Model, loss=None, task: str = "classification") -> Objective:
    name = loss or models_lib.default_loss(model.spec, task)
    return Objective(losses_lib.get(name), name != "mse")


def _mask_like(mask_B, per_example):
    return mask_B.reshape(mask_B.shape + (1,) * (per_example.ndim - 1)) * jnp.ones_like(per_example)


def _batch_sums(model: Model, objective: Objective, params, batch, key, train: bool):
    """Sums over the batch's real examples: loss, correct predictions, count."""
    kwargs = {"lengths": batch["lengths"]} if "lengths" in batch else {}
    outputs = model.apply(params, batch["x"], key=key, train=train, **kwargs)
    per_example = objective.loss(outputs, batch["y"])
    weight = _mask_like(batch["mask"].astype(per_example.dtype), per_example)
    sums = {"loss": jnp.sum(per_example * weight), "count": jnp.sum(weight)}
    if objective.classify:
        correct = metrics_lib.predict_labels(outputs) == batch["y"]
        sums["correct"] = jnp.sum(correct.reshape(weight.shape) * weight)
    return sums


def _objective_value(model: Model, objective: Objective, params, batch, hparams, reduce=None):
    """The full objective at `params` on `batch` (no dropout): mean loss + l2 penalty."""
    sums = _batch_sums(model, objective, params, batch, None, train=False)
    return _value_of_sums(reduce(sums) if reduce else sums, params, hparams)


def _value_of_sums(sums, params, hparams):
    """Mean loss of the batch sums plus the l2 penalty of `params`."""
    penalty = losses_lib.l2_penalty(params)
    return sums["loss"] / jnp.maximum(sums["count"], 1.0) + hparams["l2"] * penalty


def make_train_step(model: Model, objective: Objective, optimizer, *, axis_name: str | None = None):
    """The pure step `train_step(state, batch) -> (state, metrics)`.

    With `axis_name`, the step runs per replica (under `shard_map` or `pmap`) and
    the loss and gradient *sums* and example counts are `psum`med over that axis
    before dividing, so the update equals the single-device one on the whole
    global batch, padding included.
    """

    def reduce(tree):
        return jax.lax.psum(tree, axis_name) if axis_name else tree

    def data_loss(params, batch, key):
        sums = _batch_sums(model, objective, params, batch, key, train=True)
        return sums["loss"], sums

    objective_value = functools.partial(_objective_value, model, objective, reduce=reduce)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        if axis_name:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        grads, sums = jax.grad(data_loss, has_aux=True)(state.params, batch, key)
        grads, sums = reduce((grads, sums))
        count = jnp.maximum(sums["count"], 1.0)
        l2 = state.hparams["l2"]
        penalty, penalty_grads = jax.value_and_grad(losses_lib.l2_penalty)(state.params)
        grads = jax.tree.map(lambda g, pg: g / count + l2 * pg, grads, penalty_grads)
        value = sums["loss"] / count + l2 * penalty
        updates, opt_state = optimizer.update(
            grads,
            state.opt_state,
            state.params,
            value=value,
            grad=grads,
            value_fn=functools.partial(objective_value, batch=batch, hparams=state.hparams),
        )
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "count": sums["count"]}
        if "correct" in sums:
            metrics["accuracy"] = sums["correct"] / count
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return train_step


def make_steps(train_step):
    """Steps over given batches as one program:
    `steps(state, x, y, index_SxB, mask_SxB) -> (state, metrics)`.

    `lax.scan`s `train_step` over the batches `x[index_SxB[s]]`; per-step
    metrics come back stacked `[S]`.
    """

    def steps(state, x, y, index_SxB, mask_SxB):
        def body(state, inputs):
            index_B, mask_B = inputs
            return train_step(state, {"x": x[index_B], "y": y[index_B], "mask": mask_B})

        return jax.lax.scan(body, state, (index_SxB, mask_SxB))

    return steps


def make_epoch(train_step, *, batch_size: int, drop_remainder: bool = False):
    """One epoch as one program: `epoch(state, x, y, key) -> (state, metrics)`.

    Shuffles the on-device arrays with `key`, then `lax.scan`s `train_step` over
    the batches; per-step metrics come back stacked `[steps]`. The same batches,
    in the same order, as `batches(...)` on the host. A full batch (`batch_size`
    equal to the number of examples, as for lbfgs) is used as it is, unshuffled:
    the order does not matter to a sum and the gather would cost a copy of `x`.
    """
    steps = make_steps(train_step)

    def epoch(state, x, y, key):
        if x.shape[0] == batch_size:
            mask_B = jnp.ones((batch_size,), jnp.float32)
            state, metrics = train_step(state, {"x": x, "y": y, "mask": mask_B})
            return state, jax.tree.map(lambda m: m[None], metrics)
        return steps(state, x, y, *epoch_indices(key, x.shape[0], batch_size, drop_remainder))

    return epoch


# Families whose `apply` ignores `train` and `key`: their full-batch steps can take
# the gradient the line search computed at the new params instead of computing it again.
_DETERMINISTIC_FAMILIES = ("linear_regression", "logistic_regression", "svm")
MAX_ITERATIONS_PER_PROGRAM = 1024


def make_full_batch_iterations(model: Model, objective: Objective, optimizer, train_step):
    """Full-batch iterations (lbfgs) as one program:
    `iterations(state, x, y, num, tol, *, capacity) -> (state, metrics, ran, converged)`.

    A `lax.while_loop` takes up to `num <= capacity` steps on the whole of `(x, y)`
    and stops early once the gradient at the new params (the one the line search
    stored) has no entry above `tol` in absolute value (`tol < 0`: never). Per-step
    metrics come back in `[capacity]` buffers whose first `ran` entries are real.

    For the linear families a step's gradient is the line search's from the step
    before (the first step of a call computes it), and only a forward pass is added
    for the metrics: the same iterates as `train_step`'s, for about half the work.
    """
    reuse_grad = model.family in _DETERMINISTIC_FAMILIES

    def reusing_step(state: TrainState, batch, fresh):
        value_fn = functools.partial(
            _objective_value, model, objective, batch=batch, hparams=state.hparams
        )
        sums = _batch_sums(model, objective, state.params, batch, None, train=False)
        count = jnp.maximum(sums["count"], 1.0)
        value = _value_of_sums(sums, state.params, state.hparams)
        grads = jax.lax.cond(
            fresh,
            jax.grad(value_fn),
            lambda params: optax.tree.get(state.opt_state, "grad"),
            state.params,
        )
        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, value=value, grad=grads, value_fn=value_fn
        )
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "count": sums["count"]}
        if "correct" in sums:
            metrics["accuracy"] = sums["correct"] / count
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    def step(state, batch, fresh):
        if reuse_grad:
            return reusing_step(state, batch, fresh)
        return train_step(state, batch)

    def iterations(state, x, y, num, tol, *, capacity: int):
        batch = {"x": x, "y": y, "mask": jnp.ones((x.shape[0],), jnp.float32)}
        shapes = jax.eval_shape(step, state, batch, True)[1]
        buffers = jax.tree.map(lambda m: jnp.zeros((capacity, *m.shape), m.dtype), shapes)

        def body(carry):
            state, i, _, buffers = carry
            state, metrics = step(state, batch, i == 0)
            buffers = jax.tree.map(lambda b, m: b.at[i].set(m), buffers, metrics)
            grads = optax.tree.get(state.opt_state, "grad")
            largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
            return state, i + 1, largest <= tol, buffers

        def more(carry):
            _, i, converged, _ = carry
            return (i < num) & ~converged

        start = (state, jnp.zeros((), jnp.int32), jnp.zeros((), bool), buffers)
        state, ran, converged, buffers = jax.lax.while_loop(more, body, start)
        return state, buffers, ran, converged

    return iterations


def epoch_indices(key, num_examples: int, batch_size: int, drop_remainder: bool = False):
    """The example indices `[S, B]` and mask `[S, B]` of one shuffled epoch.

    A last partial batch is dropped, or padded with index 0 and mask 0.
    """
    order = jax.random.permutation(key, num_examples)
    steps = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
    if steps == 0:
        raise ConfigError(
            f"batch_size {batch_size} with drop_remainder leaves no batch of "
            f"{num_examples} examples"
        )
    pad = steps * batch_size - num_examples
    if pad > 0:
        order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    order = order[: steps * batch_size]
    mask = (jnp.arange(steps * batch_size) < num_examples).astype(jnp.float32)
    return order.reshape(steps, batch_size), mask.reshape(steps, batch_size)


# ------------------------------------------------------------------ state


def init_state(
    model: Model, optimizer, input_shape, *, seed: int = 0, l2: float = 0.0
) -> TrainState:
    """A fresh `TrainState`: params from `model.init`, the optimizer's state."""
    key = jax.random.key(seed)
    init_key, run_key = jax.random.split(key)
    params = model.init(init_key, tuple(input_shape))
    return TrainState(
        params=params,
        # Copied leaf by leaf and strongly typed: optax's lbfgs aliases one buffer
        # twice in its initial state (donation rejects that) and starts with
        # weak-typed scalars its update returns strong (the 2nd step recompiled).
        opt_state=jax.tree.map(lambda v: jnp.array(v, dtype=v.dtype), optimizer.init(params)),
        step=jnp.zeros((), jnp.int32),
        key=run_key,
        hparams={"l2": jnp.asarray(l2, jnp.float32)},
    )


# ------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=64)
def _jitted_apply(apply):
    return jax.jit(apply)


def predict(model: Model, params, x, *, batch_size: int = 1024, **kwargs) -> np.ndarray:
    """Model outputs for all of `x`, in fixed-size jitted batches (no recompiles)."""
    x = np.asarray(x)
    n = x.shape[0]
    size = min(batch_size, n)
    apply = _jitted_apply(model.apply)
    outputs = []
    for start in range(0, n, size):
        chunk = x[start : start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = np.concatenate([chunk, np.zeros((size - real, *x.shape[1:]), x.dtype)])
        outputs.append(np.asarray(apply(params, chunk, **kwargs))[:real])
    return np.concatenate(outputs)


def evaluate(
    model: Model,
    params,
    x,
    y,
    *,
    loss=None,
    metric=None,
    task: str = "classification",
    batch_size: int = 1024,
) -> dict:
    """Loss and metric over a whole set: `{"loss": float, "accuracy" | "r2": float}`."""
    objective = make_objective(model, loss, task)
    check_arrays(x, y, task=_task(objective), where="evaluation data")
    metric = metric or ("accuracy" if objective.classify else "r2")
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    outputs = jnp.asarray(predict(model, params, x, batch_size=batch_size))
    y = jnp.asarray(y)
    return {
        "loss": float(jnp.mean(objective.loss(outputs, y))),
        metric_name: float(metrics_lib.get(metric)(outputs, y)),
    }


# ------------------------------------------------------------------ fit


def _task_of(y) -> str:
    return "classification" if np.issubdtype(y.dtype, np.integer) else "regression"


def _as_arrays(data, validation):
    """(x, y, x_val, y_val, x_test, y_test, task) from a Dataset or an (x, y) pair;
    for a `BatchStream`, (x, y) are its first examples, for checks and shapes."""
    if isinstance(data, data_lib.BatchStream):
        if validation:
            raise ConfigError("a BatchStream has no validation split; fit a Dataset for one")
        sample = data.source.read(np.arange(min(len(data.source), 1024)))
        return sample["x"], sample["y"], None, None, None, None, _task_of(sample["y"])
    if isinstance(data, Dataset):
        val = (data.x_val, data.y_val) if data.x_val is not None else (None, None)
        if validation:
            raise ConfigError("pass validation= to fml.data.load for a Dataset, not to fit")
        return data.x_train, data.y_train, *val, data.x_test, data.y_test, data.task
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = as_array(data[0], "x", "training data"), as_array(data[1], "y", "training data")
        task = _task_of(y)
        x_val = y_val = None
        if validation and x.ndim:
            in_range(validation, "validation fraction", 0.0, 1.0, closed="neither")
            cut = x.shape[0] - max(1, int(round(validation * x.shape[0])))
            x, x_val, y, y_val = x[:cut], x[cut:], y[:cut], y[cut:]
        return x, y, x_val, y_val, None, None, task
    raise ConfigError(
        f"expected data as an fml.data.Dataset or an (x, y) tuple, got {type(data).__name__}"
    )


def _task(objective: Objective) -> str:
    return "classification" if objective.classify else "regression"


def _batch_shape(dims) -> str:
    return str(("N", *dims)).replace("'", "")


def _check_targets(model: Model, params, x, y, objective: Objective, where: str) -> int | None:
    """Traces `apply` on one example (checking the input) and checks the targets'
    shape against the output's; returns the classifier's output width, or None."""
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
    outputs = tuple(out.shape[1:])
    if objective.classify:
        want = () if outputs == (1,) else outputs[:-1]
        if tuple(y.shape[1:]) != want:
            raise ShapeError(
                f"{where}: expected integer labels of shape {_batch_shape(want)} for "
                f"{model.family} outputs of shape {_batch_shape(outputs)}, got {y.shape}"
            )
        return outputs[-1]
    if tuple(y.shape[1:]) not in (outputs, () if outputs == (1,) else None):
        raise ShapeError(
            f"{where}: float targets mean regression, and the {model.family} outputs are "
            f"{_batch_shape(outputs)}, so expected y of shape {_batch_shape(outputs)}, got "
            f"{y.shape}; for classification pass integer labels"
        )
    return None


def _mean_metrics(step_metrics) -> dict:
    """Example-weighted means of per-step metrics."""
    counts = np.asarray(step_metrics["count"])
    total = max(float(counts.sum()), 1.0)
    return {
        k: float((np.asarray(v) * counts).sum() / total)
        for k, v in step_metrics.items()
        if k != "count"
    }


class History(dict):
    """Per-epoch metrics: `history["train_loss"][epoch]`, `"val_accuracy"`, `"epoch_time"`...;
    `history["test"]` holds the final test metrics when the data has a test split."""

    def append(self, **values):
        for k, v in values.items():
            self.setdefault(k, []).append(v)


def fit(
    model: Model,
    data,
    *,
    optimizer="adam",
    learning_rate=1e-3,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    loss=None,
    metric=None,
    l2: float | None = None,
    l1: float = 0.0,  # [accuracy] L1 penalty (fml.proximal)
    validation: float = 0.0,
    patience: int | None = None,
    fused: bool = False,
    drop_remainder: bool = False,
    clip_norm: float | None = None,
    quiet: bool = False,
    state: TrainState | None = None,
    optimizer_kwargs: dict | None = None,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    checkpoint_every_epochs: int | None = 1,
    keep: int | None = 3,
    resume: bool = False,
    parallel: str | None = None,
    devices=None,
    tol: float | None = None,
):
    """Trains `model` on `data` with minibatch gradient descent.

    Args:
      model: a `Model`.
      data: an `fml.data.Dataset` (its validation and test splits are used), an
        `(x, y)` pair of arrays, or an `fml.data.BatchStream` (data streamed from
        disk, per-process shards): its batch size, shuffling seed and
        last-batch policy replace `batch_size` and `drop_remainder` here.
      optimizer: a name ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad",
        "lbfgs" for full-batch convex fits) or an optax `GradientTransformation`.
      learning_rate: a float or an optax schedule.
      epochs: passes over the training data (for lbfgs, iterations).
      batch_size: examples per step (lbfgs uses the full batch).
      seed: seeds init, shuffling and dropout.
      loss, metric: override the family's defaults (names or callables).
      l2: coefficient of `0.5 * sum(w²)` in the objective; by default the family's
        (`1 / (C n)` for the SVM, else 0).
      l1: coefficient of `sum |w|` (weights, not biases): with optimizer "fista" a
        full-batch FISTA solve to the sparse optimum, else the optimizer's step
        followed by a soft-threshold (`fml.proximal`); with `l2`, elastic net.
      validation: fraction of `(x, y)` held out for validation (arrays only).
      patience: stop when validation loss has not improved for this many epochs,
        and return the best epoch's params.
      fused: run each epoch as one `lax.scan` over the data on the device.
      drop_remainder: drop a last partial batch instead of padding it with a mask.
      clip_norm: clip gradients to this global norm.
      quiet: no progress bar.
      state: continue from this `TrainState` instead of a fresh one (for `epochs`
        more epochs, starting mid-epoch if `state.step` is).
      optimizer_kwargs: extra arguments of the optax factory.
      checkpoint_dir: a run directory to checkpoint into (`fml.checkpoint`):
        the whole run state, every `checkpoint_every` steps, every
        `checkpoint_every_epochs` epochs and at the end. A new run refuses a
        directory that already holds checkpoints.
      checkpoint_every: steps between checkpoints (None: only at epoch ends).
      checkpoint_every_epochs: epochs between checkpoints (None: only at the end).
      keep: how many of the latest checkpoints to keep (None: all).
      resume: continue the run in `checkpoint_dir` from its latest checkpoint to a
        total of `epochs` epochs, with the same batches, randomness and history as
        if it had never stopped (starts fresh when there is no checkpoint yet).
        Needs the same model, data and trajectory settings (optimizer, learning
        rate, batch size, seed, ...); else `CheckpointError`.
      parallel: data parallelism over `devices` (`fml.parallel`): "shard_map" (a
        mesh; spans every process joined by `fml.parallel.initialize`) or "pmap".
        None (default) is off: one device, exactly as before, unless several
        processes have joined, where it means "shard_map". `batch_size` stays the
        global batch; one that does not divide by the device count is padded with
        mask 0.
      devices: with `parallel`, None for every device, an int `n` for the first
        `n`, or a list of `jax.Device`s.

      tol: full-batch optimizers (lbfgs) only: stop once no entry of the gradient
        at the new params exceeds `tol` in absolute value (as scikit-learn's `tol`
        for lbfgs, on the same mean objective); the history then ends at that
        iteration. None (default): run all `epochs` iterations.

    With a full-batch optimizer every iteration up to the next checkpoint or
    validation runs in one compiled program (a `lax.while_loop`).

    Returns:
      `(state, history)`: the final `TrainState` and a `History` of per-epoch metrics.

    Raises:
      TrainingError: a step's loss became NaN or inf (the message names the step
        and the last good checkpoint, which is kept).
      CheckpointError: a checkpoint cannot be written or does not fit this run.

    Example:
      >>> import fml
      >>> data = fml.data.load("breast_cancer")
      >>> model = fml.models.logistic_regression(2)
      >>> state, history = fml.fit(model, data, epochs=5, quiet=True)
      >>> history["test"]["accuracy"] > 0.9
      True
    """
    if not isinstance(model, Model):
        raise ConfigError(f"expected an fml Model, got {type(model).__name__}")
    x, y, x_val, y_val, x_test, y_test, task = _as_arrays(data, validation)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"expected seed to be an int, got {seed!r}")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, int) or patience < 0
    ):
        raise ConfigError(f"expected patience to be an int >= 0 or None, got {patience!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"expected epochs to be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"expected batch_size to be a positive int, got {batch_size!r}")
    for name, every in (
        ("checkpoint_every", checkpoint_every),
        ("checkpoint_every_epochs", checkpoint_every_epochs),
    ):
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"expected {name} to be a positive int or None, got {every!r}")
    if resume and state is not None:
        raise ConfigError("pass either state= or resume=True, not both")
    check_arrays(x, y, task=task, where="training data")
    stream = data if isinstance(data, data_lib.BatchStream) else None
    num_examples = len(stream.source) if stream else x.shape[0]
    objective = make_objective(model, loss, task)
    if objective.classify and task == "regression":
        raise ConfigError(
            f"{model.family} with loss {loss or 'default'} needs integer class "
            "labels, got float targets"
        )
    full_batch = isinstance(optimizer, str) and optimizer in FULL_BATCH_OPTIMIZERS
    if tol is not None:
        if not full_batch:
            raise ConfigError(f"tol stops full-batch optimizers (lbfgs), not {optimizer!r}")
        tol = in_range(tol, "tol", 0.0, math.inf)
    if stream is not None:
        if fused or full_batch or checkpoint_dir is not None:
            raise ConfigError(
                "a BatchStream feeds per-step training: not fused=True, lbfgs nor "
                "checkpoint_dir (save stream.position with your own checkpoints)"
            )
        batch_size, drop_remainder = stream.batch_size, stream.drop_remainder
    batch_size = num_examples if full_batch else batch_size
    if batch_size > num_examples and drop_remainder:
        raise ConfigError(f"batch_size {batch_size} > {num_examples} examples with drop_remainder")
    optimizer, batch_size = proximal.l1_optimizer(  # [accuracy] L1 as a proximal step
        optimizer,
        l1,
        batch_size,
        num_examples,
        functools.partial(
            make_optimizer,
            learning_rate=learning_rate,
            clip_norm=clip_norm,
            **(optimizer_kwargs or {}),
        ),
    )
    tx = make_optimizer(optimizer, learning_rate, clip_norm=clip_norm, **(optimizer_kwargs or {}))
    if l2 is None:
        l2 = models_lib.l2_strength(model.spec, num_examples)
    l2 = in_range(l2, "l2", 0.0, math.inf)
    if state is None:
        state = init_state(model, tx, x.shape[1:], seed=seed, l2=l2)
    else:
        state = state._replace(hparams={**state.hparams, "l2": jnp.asarray(l2, jnp.float32)})
    expected = _check_targets(model, state.params, x, y, objective, "training data")
    if objective.classify:  # the rest was checked above
        check_labels(y, expected, where="training data")
    for name, (xs, ys) in {
        "validation data": (x_val, y_val),
        "test data": (x_test, y_test),
    }.items():
        if xs is not None:
            check_arrays(xs, ys, task=task, num_outputs=expected, where=name)
            if xs.shape[1:] != x.shape[1:]:
                raise ShapeError(f"{name}: expected x of shape (N, {x.shape[1:]}), got {xs.shape}")
            _check_targets(model, state.params, xs, ys, objective, name)

    steps_per_epoch = _steps_per_epoch(num_examples, batch_size, drop_remainder)
    history, best, epoch_metrics, stopped = History(), (math.inf, None, -1), [], False
    checkpoints = None
    if checkpoint_dir is not None:
        from fml import checkpoint as checkpoint_lib

        config = checkpoint_lib.fit_config(
            x,
            y,
            task=task,
            optimizer=optimizer,
            learning_rate=learning_rate,
            optimizer_kwargs=optimizer_kwargs or {},
            clip_norm=clip_norm,
            batch_size=batch_size,
            drop_remainder=drop_remainder,
            seed=seed,
            loss=loss,
            l2=float(l2),
            epochs=epochs,
            fused=fused,
            patience=patience,
            tol=tol,
        )
        checkpoints = checkpoint_lib.Checkpointer(checkpoint_dir, keep=keep)
        restored = checkpoints.start(model, tx, config, resume=resume)
        if restored is not None:
            state = restored.state
            history, best, epoch_metrics, stopped = _progress_from_meta(restored)
    elif resume:
        raise ConfigError("resume=True needs the checkpoint_dir of the run to continue")

    def save_checkpoint():
        checkpoints.save(
            local(state),
            {
                "spec": model.spec,
                "config": config,
                "position": _position(int(local(state).step), steps_per_epoch),
                "history": dict(history),
                "epoch_metrics": {k: v.tolist() for k, v in _stack_metrics(epoch_metrics).items()},
                "best": None if best[1] is None else {"loss": best[0], "epoch": best[2]},
                "stopped": stopped,
            },
            best_params=best[1] if patience is not None else None,
        )

    dp = None
    if parallel is not None or jax.process_count() > 1:
        from fml import parallel as parallel_lib  # it builds on this module

        if full_batch:
            # its line search's psums inside a while loop deadlock XLA's CPU collectives
            raise ConfigError(f"optimizer {optimizer!r} is full-batch: fit it with parallel=None")
        dp = parallel_lib.data_parallel(parallel or "shard_map", devices)
        quiet = quiet or not parallel_lib.is_main_process()
        state = dp.replicate(state)
    local = dp.local if dp else lambda state: state
    if dp and stream is not None:
        raise ConfigError(
            "fit(parallel=...) feeds on-host arrays; a BatchStream under data parallelism is "
            "not supported yet: pass arrays, or drive the stream with fml.parallel yourself"
        )
    iterate = runner = None
    settings = (loss, task, optimizer, learning_rate, clip_norm, optimizer_kwargs)
    if dp:
        runner = functools.partial(
            dp.step_runner, make_train_step(model, objective, tx, axis_name="data")
        )
    elif full_batch:  # every iteration up to the next checkpoint or validation in one program
        programs = _compiled_steps(
            model, settings, batch_size=batch_size, drop_remainder=False, fused="full_batch"
        )
        iterate = _iteration_runner(programs, x, y)
    else:
        programs = _compiled_steps(
            model, settings, batch_size=batch_size, drop_remainder=drop_remainder, fused=fused
        )
        runner = functools.partial(_step_runner, programs, stream=stream)
    if runner is not None:
        run_steps = runner(
            x,
            y,
            seed=seed,
            batch_size=batch_size,
            drop_remainder=drop_remainder,
            fused=fused,
        )
    start_epoch, offset = divmod(int(local(state).step), steps_per_epoch)
    end_epoch = start_epoch if stopped else (epochs if resume else start_epoch + epochs)
    bar = _progress(range(start_epoch, end_epoch), quiet)
    ahead, converged_at = {}, None  # full batch: epoch -> (metrics, seconds) already run
    for epoch in bar:
        started = time.perf_counter()
        if iterate is not None:
            if epoch not in ahead:
                span = _full_batch_span(
                    epoch,
                    end_epoch,
                    validation=x_val is not None,
                    checkpoint_every=checkpoint_every if checkpoints else None,
                    checkpoint_every_epochs=checkpoint_every_epochs if checkpoints else None,
                )
                state, chunk, converged = iterate(state, span, -1.0 if tol is None else tol)
                _check_finite_loss(chunk, epoch, steps_per_epoch, checkpoints)
                ran = len(chunk["loss"])
                seconds = (time.perf_counter() - started) / max(ran, 1)
                ahead = {
                    epoch + j: ({k: v[j : j + 1] for k, v in chunk.items()}, seconds)
                    for j in range(ran)
                }
                converged_at = epoch + ran - 1 if converged else None
            chunk, epoch_time = ahead.pop(epoch)
            epoch_metrics.append(chunk)
        else:
            for begin, end in _step_ranges(epoch, offset, steps_per_epoch, checkpoint_every):
                state, chunk = run_steps(state, epoch, begin, end)
                chunk = jax.device_get(chunk)
                _check_finite_loss(
                    chunk, epoch * steps_per_epoch + begin, steps_per_epoch, checkpoints
                )
                epoch_metrics.append(chunk)
                if checkpoints is not None and end < steps_per_epoch:
                    save_checkpoint()
            epoch_time = time.perf_counter() - started
        offset = 0
        train = _mean_metrics(_stack_metrics(epoch_metrics))
        epoch_metrics = []
        history.append(
            epoch=epoch,
            epoch_time=epoch_time,
            **{f"train_{k}": v for k, v in train.items()},
        )
        stopped = epoch == converged_at
        if x_val is not None:
            params = local(state).params
            val = evaluate(model, params, x_val, y_val, loss=loss, metric=metric, task=task)
            history.append(**{f"val_{k}": v for k, v in val.items()})
            if val["loss"] < best[0]:
                best = (val["loss"], jax.device_get(params), epoch)
            else:
                stopped = patience is not None and epoch - best[2] >= patience
        due = _divides(checkpoint_every_epochs, epoch + 1) or _divides(
            checkpoint_every, (epoch + 1) * steps_per_epoch
        )
        if checkpoints is not None and (due or stopped):
            save_checkpoint()
        if not quiet:
            bar.set_postfix(
                {k: f"{v[-1]:.4f}" for k, v in history.items() if k.startswith(("train_", "val_"))}
            )
        if stopped:
            break
    if checkpoints is not None:
        save_checkpoint()
        checkpoints.close()
    state = local(state)
    if patience is not None and best[1] is not None:
        state = state._replace(params=jax.device_put(best[1]))
        history["best_epoch"] = best[2]
    if x_test is not None:
        history["test"] = evaluate(
            model, state.params, x_test, y_test, loss=loss, metric=metric, task=task
        )
    return state, history


def _full_batch_span(
    epoch: int, end_epoch: int, *, validation: bool, checkpoint_every, checkpoint_every_epochs
) -> int:
    """How many full-batch epochs (one step each) to run in one program from `epoch`:
    up to the next validation or checkpoint, so the host does those in their place."""
    if validation:
        return 1
    span = min(end_epoch - epoch, MAX_ITERATIONS_PER_PROGRAM)
    for every in (checkpoint_every, checkpoint_every_epochs):
        if every:
            span = min(span, every - epoch % every)
    return span


def _steps_per_epoch(n: int, batch_size: int, drop_remainder: bool) -> int:
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _divides(every: int | None, n: int) -> bool:
    return every is not None and n % every == 0


def _position(step: int, steps_per_epoch: int) -> dict:
    """Where in the data step `step` is: `{"epoch", "step_in_epoch"}`."""
    return dict(zip(("epoch", "step_in_epoch"), divmod(step, steps_per_epoch)))


def _step_ranges(epoch: int, begin: int, steps_per_epoch: int, every: int | None):
    """`(begin, end)` step ranges covering an epoch from `begin`, cut where the
    global step is a multiple of `every` (checkpoints go there)."""
    while begin < steps_per_epoch:
        end = steps_per_epoch
        if every:
            end = min(end, begin + every - (epoch * steps_per_epoch + begin) % every)
        yield begin, end
        begin = end


_COMPILED: dict = {}
_MAX_COMPILED = 32


def _compiled_steps(model: Model, settings: tuple, *, batch_size, drop_remainder, fused):
    """The jitted programs `fit` runs: `(run_epoch, run_scan)` when fused,
    `(iterations, None)` for a full-batch optimizer (`fused="full_batch"`), else
    `(step, None)`. Reused when the same model object is fitted again with the
    same settings, so a second `fit` does not compile again (a float learning
    rate lives in the optimizer state, not in the program)."""
    loss, task, optimizer, learning_rate, clip_norm, optimizer_kwargs = settings
    key = (
        model.init,
        model.apply,
        loss,
        task,
        optimizer,
        learning_rate if callable(learning_rate) else None,
        clip_norm,
        tuple(sorted((optimizer_kwargs or {}).items())),
        batch_size,
        drop_remainder,
        fused,
    )
    try:
        programs = _COMPILED.get(key)
    except TypeError:  # an unhashable setting: build afresh, uncached
        key, programs = None, None
    if programs is None:
        tx = make_optimizer(
            optimizer, learning_rate, clip_norm=clip_norm, **(optimizer_kwargs or {})
        )
        train_step = make_train_step(model, make_objective(model, loss, task), tx)
        if fused == "full_batch":
            iterations = make_full_batch_iterations(
                model, make_objective(model, loss, task), tx, train_step
            )
            programs = (
                jax.jit(iterations, static_argnames="capacity", donate_argnums=0),
                None,
            )
        elif fused:
            epoch = make_epoch(train_step, batch_size=batch_size, drop_remainder=drop_remainder)
            programs = (
                jax.jit(epoch, donate_argnums=0),
                jax.jit(make_steps(train_step), donate_argnums=0),
            )
        else:
            programs = (jax.jit(train_step, donate_argnums=0), None)
        if key is not None:
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = programs
    return programs


def _step_runner(programs, x, y, *, seed, batch_size, drop_remainder, fused, stream=None):
    """`run(state, epoch, begin, end) -> (state, metrics)`: steps `begin..end-1` of an
    epoch, as one scan over on-device data (`fused`) or as jitted steps fed by a
    `BatchStream` (over `x, y` unless `stream` is given).

    The batches are a pure function of `(seed, epoch)`: epoch key
    `fold_in(fold_in(key(seed), 1), epoch)` shuffles with `epoch_indices`.
    """
    if not fused:
        step, _ = programs
        stream = stream or data_lib.BatchStream(
            data_lib.ArraySource(x, y),
            batch_size=batch_size,
            seed=seed,
            drop_remainder=drop_remainder,
            process_index=0,
            process_count=1,
        )
        return lambda state, epoch, begin, end: _host_steps(
            step, state, stream.device_batches(epoch, begin, end)
        )

    shuffle_key = jax.random.fold_in(jax.random.key(seed), 1)
    steps_per_epoch = _steps_per_epoch(x.shape[0], batch_size, drop_remainder)
    run_epoch, run_scan = programs
    x_dev, y_dev = jax.device_put(x), jax.device_put(y)

    @functools.lru_cache(maxsize=1)
    def batches(epoch):
        key = jax.random.fold_in(shuffle_key, epoch)
        return epoch_indices(key, x.shape[0], batch_size, drop_remainder)

    def run(state, epoch, begin, end):
        if (begin, end) == (0, steps_per_epoch):
            return run_epoch(state, x_dev, y_dev, jax.random.fold_in(shuffle_key, epoch))
        index_SxB, mask_SxB = (a[begin:end] for a in batches(epoch))
        return run_scan(state, x_dev, y_dev, index_SxB, mask_SxB)

    return run


def _iteration_runner(programs, x, y):
    """`run(state, num, tol) -> (state, metrics, converged)`: up to `num` full-batch
    steps on `(x, y)` (placed on the device once) in one program; `metrics` are the
    steps' `{name: [ran]}` on the host."""
    iterations, _ = programs
    x_dev, y_dev = jax.device_put(x), jax.device_put(y)

    def run(state, num: int, tol: float):
        capacity = min(1 << (num - 1).bit_length(), MAX_ITERATIONS_PER_PROGRAM)
        state, buffers, ran, converged = iterations(
            state,
            x_dev,
            y_dev,
            jnp.asarray(num, jnp.int32),
            jnp.asarray(tol, jnp.float32),
            capacity=capacity,
        )
        ran, converged, buffers = jax.device_get((ran, converged, buffers))
        return state, {k: v[:ran] for k, v in buffers.items()}, bool(converged)

    return run


def _host_steps(step, state, batches):
    """Jitted steps over `batches` from the input pipeline (for arrays, the
    batches of `make_steps`, read and placed ahead of each step)."""
    per_step = []
    for batch in batches:
        state, m = step(state, batch)
        per_step.append(m)
    return state, jax.tree.map(lambda *v: jnp.stack(v), *per_step)


def _stack_metrics(chunks) -> dict:
    """The per-step metrics of consecutive step ranges, joined: `{name: [steps]}`."""
    if not chunks:
        return {}
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in chunks[0]}


def _check_finite_loss(chunk, first_step: int, steps_per_epoch: int, checkpoints) -> None:
    """Raises `TrainingError` naming the first step whose loss is NaN or inf."""
    loss = np.asarray(chunk["loss"])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        epoch = (first_step + int(bad[0])) // steps_per_epoch
        where = (
            checkpoints.describe_latest()
            if checkpoints is not None
            else "no checkpoint_dir was set"
        )
        raise TrainingError(
            f"loss became {loss[bad[0]]} in step {first_step + bad[0] + 1} (epoch {epoch}); "
            f"{where}; lower the learning rate or set clip_norm"
        )


def _progress_from_meta(restored):
    """`(history, best, epoch_metrics, stopped)` of a run, from its checkpoint."""
    meta = restored.meta
    best = (math.inf, None, -1)
    if meta.get("best"):
        best = (meta["best"]["loss"], restored.best_params, meta["best"]["epoch"])
    partial = meta.get("epoch_metrics") or {}
    epoch_metrics = [{k: np.asarray(v, np.float32) for k, v in partial.items()}] if partial else []
    return History(meta.get("history", {})), best, epoch_metrics, bool(meta.get("stopped"))


def _progress(epochs, quiet):
    if quiet:
        return epochs
    from tqdm.auto import tqdm

    return tqdm(epochs, desc="epochs", leave=False)
