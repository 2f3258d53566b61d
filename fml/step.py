"""The training step: a pure `train_step(state, batch) -> (state, metrics)`, the
programs built from it (steps over given batches, a scanned epoch, full-batch
iterations), the optimizer by name and the fresh `TrainState`.

A batch is a dict `{"x": [B, ...], "y": [B, ...], "mask": [B]}`; the mask marks
real examples (padding of a last partial batch has mask 0 and contributes
nothing to the loss, gradients or metrics).
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fml import batching
from fml import losses as losses_lib
from fml import metrics as metrics_lib
from fml import models as models_lib
from fml._model import Model
from fml.errors import ConfigError, in_range, unknown


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
# Learning-rate schedules by name (`make_schedule`); None is "constant".
SCHEDULES = ("constant", "cosine")


class FullBatch(NamedTuple):
    """An optax transformation that needs the whole data set every step (its line
    search evaluates the full objective): `fit` runs it on one full batch."""

    init: Callable
    update: Callable


def full_batch(tx) -> FullBatch:
    """Marks an optax transformation (e.g. `optax.lbfgs()`) as full-batch."""
    return FullBatch(tx.init, tx.update)


def is_full_batch(optimizer) -> bool:
    """Whether `optimizer` (a name or an optax transformation) trains on the full batch."""
    if isinstance(optimizer, str):
        return optimizer in FULL_BATCH_OPTIMIZERS
    return isinstance(optimizer, FullBatch)


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
        if isinstance(optimizer, FullBatch):
            tx = optax.GradientTransformationExtraArgs(optimizer.init, optimizer.update)
        elif isinstance(optimizer, optax.GradientTransformation):
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


class CosineSchedule(NamedTuple):
    """`learning_rate` at step 0 down to 0 at step `steps` along a half cosine
    (`optax.cosine_decay_schedule`). A value, so a checkpoint records it as JSON
    (`to_json`) and `restore` rebuilds it (`schedule_from_json`)."""

    learning_rate: float
    steps: int

    def __call__(self, count):
        return optax.cosine_decay_schedule(self.learning_rate, self.steps)(count)

    def to_json(self) -> dict:
        return {"schedule": "cosine", "learning_rate": self.learning_rate, "steps": self.steps}


def make_schedule(name: str | None, learning_rate: float, steps: int):
    """The learning rate of a run of `steps` steps, by schedule name.

    Args:
      name: "constant" (or None): `learning_rate` throughout; "cosine": from
        `learning_rate` at step 0 down to 0 at step `steps` along a half cosine
        (`CosineSchedule`), so the last epoch takes small steps.
      learning_rate: the peak (initial) learning rate.
      steps: the run's optimizer steps (epochs times steps per epoch).

    Returns:
      a float or a `CosineSchedule`, for `fit`'s `learning_rate`.
    """
    if name is None or name == "constant":
        return learning_rate
    if name != "cosine":
        raise unknown("learning-rate schedule", name, SCHEDULES)
    in_range(learning_rate, "learning_rate", 0.0, math.inf, closed="neither")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"a cosine schedule needs a positive int of steps, got {steps!r}")
    return CosineSchedule(float(learning_rate), steps)


def schedule_from_json(value: dict):
    """The schedule `CosineSchedule.to_json` recorded, checked."""
    if not (isinstance(value, dict) and set(value) == {"schedule", "learning_rate", "steps"}):
        raise ConfigError(
            f'expected a schedule {{"schedule", "learning_rate", "steps"}}, got {value!r:.200}'
        )
    return make_schedule(value["schedule"], value["learning_rate"], value["steps"])


# ------------------------------------------------------------------ objective


class Objective(NamedTuple):
    """What a step minimises: `mean(loss(apply(x), y))` over real examples
    plus `hparams["l2"] * l2_penalty(params)`."""

    loss: Callable
    classify: bool


def make_objective(model: Model, loss=None, task: str = "classification") -> Objective:
    """The objective of `model` with `loss` (default: the family's for `task`).

    A loss says its task (`fml.losses.task_of`); a plain callable takes `task`.
    """
    name = loss or models_lib.default_loss(model.spec, task)
    classify = losses_lib.task_of(name, default=task) == "classification"
    return Objective(losses_lib.get(name), classify)


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


def summed_over_replicas(fn: Callable, axis_name: str) -> Callable:
    """`params -> psum(fn(params))` over `axis_name`, whose gradient is the psum of
    every replica's: the global sum's. (Under `shard_map(check_vma=False)`, the
    launchers' mode, a plain psum's gradient is this replica's term alone.)"""

    @jax.custom_vjp
    def summed(params):
        return jax.lax.psum(fn(params), axis_name)

    def forward(params):
        value, pullback = jax.vjp(fn, params)
        return jax.lax.psum(value, axis_name), pullback

    def backward(pullback, cotangent):
        (grads,) = pullback(cotangent)
        return (jax.lax.psum(grads, axis_name),)

    summed.defvjp(forward, backward)
    return summed


def _objective_value(
    model: Model, objective: Objective, params, batch, hparams, axis_name: str | None = None
):
    """The full objective at `params` on `batch` (no dropout): mean loss + l2 penalty;
    with `axis_name`, on the global batch whose rows the replicas hold."""

    def sums_of(params):
        return _batch_sums(model, objective, params, batch, None, train=False)

    if axis_name is not None:
        sums_of = summed_over_replicas(sums_of, axis_name)
    return _value_of_sums(sums_of(params), params, hparams)


def _value_of_sums(sums, params, hparams):
    """Mean loss of the batch sums plus the l2 penalty of `params`."""
    penalty = losses_lib.l2_penalty(params)
    return sums["loss"] / jnp.maximum(sums["count"], 1.0) + hparams["l2"] * penalty


def make_train_step(
    model: Model,
    objective: Objective,
    optimizer,
    *,
    axis_name: str | None = None,
    penalize: bool = True,
):
    """The pure step `train_step(state, batch) -> (state, metrics)`.

    `penalize=False` leaves the L2 penalty (`state.hparams["l2"]`) out of the
    program, for runs whose `l2` is 0: no pass over the params for it.

    With `axis_name`, the step runs per replica (under `shard_map` or `pmap`): the
    example count is `psum`med over that axis first, each replica differentiates
    its loss sum over that global count, and the gradients and sums are `psum`med,
    so the update equals the single-device one on the whole global batch, padding
    included. (Dividing the loss, not the gradients, folds the mean into the
    backward pass: no extra pass over the gradients.)
    """

    def reduce(tree):
        return jax.lax.psum(tree, axis_name) if axis_name else tree

    def data_loss(params, batch, key):
        sums = _batch_sums(model, objective, params, batch, key, train=True)
        return sums["loss"] / jnp.maximum(reduce(sums["count"]), 1.0), sums

    objective_value = functools.partial(_objective_value, model, objective, axis_name=axis_name)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        if axis_name:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        grads, sums = jax.grad(data_loss, has_aux=True)(state.params, batch, key)
        grads, sums = reduce((grads, sums))
        count = jnp.maximum(sums["count"], 1.0)
        value = sums["loss"] / count
        if penalize:
            l2 = state.hparams["l2"]
            penalty, penalty_grads = jax.value_and_grad(losses_lib.l2_penalty)(state.params)
            grads = jax.tree.map(lambda g, pg: g + l2 * pg, grads, penalty_grads)
            value = value + l2 * penalty
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


def make_batch_scan(train_step):
    """Steps over batches gathered beforehand, in order, as one program:
    `scan(state, x_SxB, y_SxB, mask_SxB) -> (state, metrics)`.

    `lax.scan`s `train_step` over step `s`'s batch `{"x": x_SxB[s], "y":
    y_SxB[s], "mask": mask_SxB[s]}`; per-step metrics come back stacked `[S]`.
    Data-parallel fused epochs run it per replica on its columns of each batch.
    """

    def scan(state, x_SxB, y_SxB, mask_SxB):
        def body(state, batch):
            x_B, y_B, mask_B = batch
            return train_step(state, {"x": x_B, "y": y_B, "mask": mask_B})

        return jax.lax.scan(body, state, (x_SxB, y_SxB, mask_SxB))

    return scan


def make_epoch(train_step, *, batch_size: int, drop_remainder: bool = False, shuffle: bool = True):
    """One epoch as one program: `epoch(state, x, y, key) -> (state, metrics)`.

    Draws the epoch's batches with `key` (`fml.batching.epoch_indices`), then
    `lax.scan`s `train_step` over them; per-step metrics come back stacked
    `[steps]`. The same batches, in the same order, as a host-fed epoch. A full batch (`batch_size`
    equal to the number of examples, as for lbfgs) is used as it is, unshuffled:
    the order does not matter to a sum and the gather would cost a copy of `x`.
    """
    steps = make_steps(train_step)

    def epoch(state, x, y, key):
        if x.shape[0] <= batch_size:
            mask_B = jnp.ones((x.shape[0],), jnp.float32)
            state, metrics = train_step(state, {"x": x, "y": y, "mask": mask_B})
            return state, jax.tree.map(lambda m: m[None], metrics)
        plan = batching.epoch_indices(key, x.shape[0], batch_size, drop_remainder, shuffle=shuffle)
        return steps(state, x, y, *plan)

    return epoch


MAX_ITERATIONS_PER_PROGRAM = 1024


def make_full_batch_iterations(
    model: Model, objective: Objective, optimizer, train_step, *, axis_name: str | None = None
):
    """Full-batch iterations (lbfgs) as one program:
    `iterations(state, x, y, mask, num, tol, *, capacity) -> (state, metrics, ran, converged)`.

    A `lax.while_loop` takes up to `num <= capacity` steps on the whole of `(x, y)`
    (the rows of mask 1) and stops early once the gradient at the new params (the one the line search
    stored) has no entry above `tol` in absolute value (`tol < 0`: never). Per-step
    metrics come back in `[capacity]` buffers whose first `ran` entries are real.

    For models whose `apply` ignores `train` and `key` (`fml.models.is_deterministic`)
    a step's gradient is the line search's from the step before (the first step of
    a call computes it), and only a forward pass is added for the metrics: the
    same iterates as `train_step`'s, for about half the work.

    With `axis_name` (and `train_step` made with it), it runs per replica on its
    rows: values, gradients and sums are those of the global batch, the same on
    every replica, so every replica takes the same steps and stops together.
    """
    reuse_grad = models_lib.is_deterministic(model.spec)

    def reusing_step(state: TrainState, batch, fresh):
        value_fn = functools.partial(
            _objective_value,
            model,
            objective,
            batch=batch,
            hparams=state.hparams,
            axis_name=axis_name,
        )
        sums = _batch_sums(model, objective, state.params, batch, None, train=False)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
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

    def iterations(state, x, y, mask, num, tol, *, capacity: int):
        batch = {"x": x, "y": y, "mask": mask}
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
