"""`fit`: a short loop over composable parts.

The parts, each in its own module (lowest first): the batch order
(`fml.batching`), the data (`fml.data`: arrays or streams), the step
(`fml.step`), the runners that move the state from step to step
(`fml.runners`, `fml.parallel`) and the callbacks that own everything else
(`fml.callbacks`). `fit` checks its arguments, picks a runner for the data and
devices, builds the callbacks its shortcuts ask for, and runs the loop: ask the
callbacks where to stop next, run the runner to there, hand them the metrics.
"""

import functools
import math
import time
from typing import NamedTuple

import jax
import numpy as np

from fml import batching, checkpoint, inputs, proximal
from fml import callbacks as callbacks_lib
from fml import data as data_lib
from fml import models as models_lib
from fml import parallel as parallel_lib
from fml._model import Model
from fml.batching import epoch_indices
from fml.data import check_arrays
from fml.errors import CheckpointError, ConfigError, in_range
from fml.inference import evaluate, predict
from fml.runners import FullBatchRunner, FusedRunner, HostRunner, epoch_segments
from fml.step import (
    FULL_BATCH_OPTIMIZERS,
    MAX_ITERATIONS_PER_PROGRAM,
    OPTIMIZERS,
    Objective,
    TrainState,
    full_batch,
    init_state,
    is_full_batch,
    make_epoch,
    make_full_batch_iterations,
    make_objective,
    make_optimizer,
    make_steps,
    make_train_step,
)


def _check_int(value, name: str, low: int, *, or_none: bool = False) -> int | None:
    """`value` if it is an int >= `low` (or None, when allowed), else `ConfigError`."""
    if value is None and or_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive int" if low == 1 else f"an int >= {low}"
        raise ConfigError(
            f"expected {name} to be {kind}{' or None' if or_none else ''}, got {value!r}"
        )
    return value


# ------------------------------------------------------------------ programs

_COMPILED: dict = {}
_MAX_COMPILED = 32


def _programs(
    model: Model, settings: tuple, kind: str, *, batch_size, drop_remainder, shuffle, dp=None
):
    """The jitted programs of one runner kind ("step", "fused", "full_batch"), on one
    device or per replica over `dp`'s mesh, reused when the same model object is
    fitted again with the same settings, so a second `fit` does not compile again (a
    float learning rate is state, not a constant)."""
    loss, task, optimizer, learning_rate, clip_norm, optimizer_kwargs, penalize = settings
    key = (
        model.init,
        model.apply,
        loss,
        task,
        optimizer,
        learning_rate if callable(learning_rate) else None,
        clip_norm,
        tuple(sorted((optimizer_kwargs or {}).items())),
        penalize,
        kind,
        batch_size,
        drop_remainder,
        shuffle,
        dp,
    )
    try:
        programs = _COMPILED.get(key)
    except TypeError:  # an unhashable setting: build afresh, uncached
        key, programs = None, None
    if programs is None:
        tx = make_optimizer(
            optimizer, learning_rate, clip_norm=clip_norm, **(optimizer_kwargs or {})
        )
        objective = make_objective(model, loss, task)
        axis = parallel_lib.AXIS if dp is not None else None
        train_step = make_train_step(model, objective, tx, axis_name=axis, penalize=penalize)
        if kind == "full_batch":
            iterations = make_full_batch_iterations(
                model, objective, tx, train_step, axis_name=axis
            )
            programs = (
                dp.full_batch(iterations)
                if dp is not None
                else jax.jit(iterations, static_argnames="capacity", donate_argnums=0),
            )
        elif dp is not None:
            programs = dp.programs(train_step, fused=kind == "fused")
        elif kind == "fused":
            epoch = make_epoch(
                train_step, batch_size=batch_size, drop_remainder=drop_remainder, shuffle=shuffle
            )
            programs = (
                jax.jit(epoch, donate_argnums=0),
                jax.jit(make_steps(train_step), donate_argnums=0),
            )
        else:
            programs = (jax.jit(train_step, donate_argnums=0),)
        if key is not None:
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = programs
    return programs


# The platform whose collectives deadlock in full-batch (lbfgs) iterations under data
# parallelism: an all-reduce inside the line search's while loop, on XLA:CPU.
FULL_BATCH_DEADLOCKS_ON = "cpu"


class Plan(NamedTuple):
    """How `fit` trains: the batching and the chosen runner's options."""

    batch_size: int
    drop_remainder: bool
    shuffle: bool
    seed: int
    fused: bool
    full_batch: bool
    tol: float | None


def _runner(model, objective, tx, settings, splits: inputs.Splits, plan: Plan, dp):
    """The runner that can take this data on these devices, or `ConfigError` why not."""
    x, y, stream = splits.x, splits.y, splits.stream
    if stream is not None and (plan.fused or plan.full_batch):
        raise ConfigError(
            "a stream reads its source batch by batch (it may not fit in memory): it feeds "
            "per-step training, not fused=True nor a full-batch optimizer; load the data "
            "as arrays for those"
        )
    if plan.full_batch:
        if dp is not None and dp.platform == FULL_BATCH_DEADLOCKS_ON:
            raise ConfigError(
                f"the optimizer is full-batch: under data parallelism on {dp.platform!r} "
                "devices its line search's collectives, inside a while loop, deadlock "
                "XLA:CPU; fit it with parallel=None there (GPUs and TPUs run it parallel)"
            )
        (iterations,) = _programs(
            model,
            settings,
            "full_batch",
            batch_size=None,
            drop_remainder=False,
            shuffle=False,
            dp=dp,
        )
        mask = np.ones((x.shape[0],), np.float32)
        if dp is not None:
            batch = dp.put_batch({"x": x, "y": y, "mask": mask})
            data = (batch["x"], batch["y"], batch["mask"])
            return FullBatchRunner(iterations, *data, plan.tol, place=dp.replicate, local=dp.local)
        return FullBatchRunner(iterations, *jax.device_put((x, y, mask)), plan.tol)
    order = {"seed": plan.seed, "drop_remainder": plan.drop_remainder, "shuffle": plan.shuffle}
    if dp is not None:
        kind = "fused" if plan.fused else "step"
        programs = _programs(
            model,
            settings,
            kind,
            batch_size=plan.batch_size,
            drop_remainder=plan.drop_remainder,
            shuffle=plan.shuffle,
            dp=dp,
        )
        if plan.fused:
            return dp.fused_runner(programs, x, y, batch_size=plan.batch_size, **order)
        stream = stream or dp.array_stream(x, y, batch_size=plan.batch_size, **order)
        return dp.host_runner(programs, stream)
    if plan.fused:
        run_epoch, run_steps = _programs(
            model,
            settings,
            "fused",
            batch_size=plan.batch_size,
            drop_remainder=plan.drop_remainder,
            shuffle=plan.shuffle,
        )
        return FusedRunner(
            run_epoch,
            run_steps,
            jax.device_put(x),
            jax.device_put(y),
            num_examples=x.shape[0],
            batch_size=plan.batch_size,
            **order,
        )
    (step,) = _programs(model, settings, "step", batch_size=None, drop_remainder=None, shuffle=None)
    if stream is None:
        stream = data_lib.BatchStream(
            data_lib.ArraySource(x, y),
            batch_size=plan.batch_size,
            process_index=0,
            process_count=1,
            **order,
        )
    return HostRunner(step, stream, stream.steps_per_epoch)


# ------------------------------------------------------------------ the loop


def _mean_metrics(step_metrics) -> dict:
    """Example-weighted means of per-step metrics."""
    counts = np.asarray(step_metrics["count"])
    total = max(float(counts.sum()), 1.0)
    return {
        k: float((np.asarray(v) * counts).sum() / total)
        for k, v in step_metrics.items()
        if k != "count"
    }


def _restore(loop, callbacks) -> None:
    """Loads a saved run (the first callback that has one) into the loop and callbacks."""
    for cb in callbacks:
        restored = cb.restore(loop)
        if restored is not None:
            loop.state = loop.place(restored["state"])
            named = callbacks_lib.callback_names(callbacks)
            for name, state in restored["callbacks"].items():
                if name in named:
                    try:
                        named[name].load_state_dict(state)
                    except (KeyError, TypeError, ValueError, AttributeError) as e:
                        raise CheckpointError(
                            f"the saved state of callback {name} does not fit it: "
                            f"{type(e).__name__}: {e}"
                        ) from e
            saved = restored["loop"].get("epoch_metrics") or {}
            loop.epoch_metrics = {k: np.asarray(v, np.float32) for k, v in saved.items()}
            loop.stop = bool(restored.get("stopped"))
            return


def _add_to_epochs(loop, first_step: int, metrics: dict, seconds: float) -> list:
    """Adds a chunk's per-step metrics to the epochs they belong to; returns the
    `(epoch, logs)` of each epoch the chunk completed (the rest stays in the loop)."""
    ran, done, ended = len(metrics["loss"]), 0, []
    for epoch, begin, end in epoch_segments(first_step, first_step + ran, loop.steps_per_epoch):
        piece = {k: np.asarray(v)[done : done + end - begin] for k, v in metrics.items()}
        done += end - begin
        loop.epoch_metrics = {
            k: np.concatenate([loop.epoch_metrics.get(k, np.zeros(0, v.dtype)), v])
            for k, v in piece.items()
        }
        loop.epoch_time += seconds * (end - begin) / ran
        if end == loop.steps_per_epoch:
            train = _mean_metrics(loop.epoch_metrics)
            logs = {"epoch": epoch, "epoch_time": loop.epoch_time}
            logs.update({f"train_{k}": v for k, v in train.items()})
            ended.append((epoch, logs))
            loop.epoch_metrics, loop.epoch_time = {}, 0.0
    return ended


def train_loop(loop, callbacks, *, epochs: int, total: bool) -> None:
    """Runs `loop` for `epochs` more epochs (`total`: up to `epochs` in all) with
    `callbacks`: the loop every `fit` runs."""
    loop.callbacks, loop.epoch_time = list(callbacks), 0.0
    for cb in callbacks:
        cb.on_train_begin(loop)
    _restore(loop, callbacks)
    loop.start_step = step = loop.step
    first_epoch = 0 if total else step // loop.steps_per_epoch
    loop.end_step = (first_epoch + epochs) * loop.steps_per_epoch
    try:
        while step < loop.end_step and not loop.stop:
            wanted = [cb.next_stop(loop, step) for cb in callbacks]
            if loop.steps_per_epoch > 1:  # epochs of one step may run many to a program
                wanted.append((step // loop.steps_per_epoch + 1) * loop.steps_per_epoch)
            to = min([loop.end_step, *(s for s in wanted if s is not None and s > step)])
            started = time.perf_counter()
            loop.state, metrics = loop.runner.run(loop.state, step, to)
            ran = len(metrics.get("loss", ()))
            loop.stop = loop.stop or ran < to - step  # a full-batch optimizer converged
            ended = (
                _add_to_epochs(loop, step, metrics, time.perf_counter() - started) if ran else []
            )
            for cb in callbacks:
                cb.on_steps(loop, step, metrics)
            for epoch, logs in ended:
                for cb in callbacks:
                    cb.on_epoch_end(loop, epoch, logs)
            step += ran
        loop.state, loop.on_host = loop.host_state(), True
        for cb in reversed(callbacks):
            cb.on_train_end(loop)
    finally:
        for cb in reversed(callbacks):
            cb.close()


# ------------------------------------------------------------------ fit


def _callbacks(splits: inputs.Splits, extra, *, patience, quiet, checkpoint_cb, options) -> list:
    """The callbacks `fit`'s shortcuts ask for, in event order, around the user's."""
    built = [callbacks_lib.NanGuard()]
    if splits.val is not None:
        built.append(callbacks_lib.Validation(*splits.val, **options))
    if patience is not None:
        built.append(callbacks_lib.EarlyStopping(patience))
    built.append(callbacks_lib.History())
    if not quiet:
        built.append(callbacks_lib.Progress())
    built.extend(_checked_callbacks(extra))
    if checkpoint_cb is not None:
        built.append(checkpoint_cb)
    return built


HOOKS = ("on_train_begin", "restore", "next_stop", "on_steps", "on_epoch_end", "on_train_end",
         "close", "state_dict", "load_state_dict")  # fmt: skip


def _checked_callbacks(callbacks) -> list:
    """`callbacks` as a list, each with every hook of the protocol, else `ConfigError`."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, list | tuple):
        raise ConfigError(
            f"expected callbacks as a list of fml.callbacks.Callback, got {type(callbacks).__name__}"
        )
    for cb in callbacks:
        missing = [hook for hook in HOOKS if not callable(getattr(cb, hook, None))]
        if missing:
            raise ConfigError(
                f"expected callbacks with the hooks of fml.callbacks.Callback (subclass it), got "
                f"{type(cb).__name__} without {', '.join(missing)}"
            )
    return list(callbacks)


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
    task: str | None = None,
    l2: float | None = None,
    l1: float = 0.0,
    validation: float = 0.0,
    patience: int | None = None,
    fused: bool = False,
    drop_remainder: bool = False,
    shuffle: bool = True,
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
    callbacks=None,
):
    """Trains `model` on `data`.

    Args:
      model: a `Model`.
      data: an `fml.data.Dataset` (its validation and test splits are used), an
        `(x, y)` pair of arrays, or an `fml.data.BatchStream` (data streamed from
        disk, per-process shards): its batch size, seed, shuffling and
        last-batch policy replace `batch_size`, `drop_remainder`, `shuffle` here.
      optimizer: a name ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
        "adagrad", "lbfgs" for full-batch convex fits) or an optax transformation
        (`fml.step.full_batch(tx)` marks one that needs the full batch).
      learning_rate: a float or an optax schedule.
      epochs: passes over the training data (for full-batch optimizers, iterations).
      batch_size: examples per global step (never more than the data holds;
        full-batch optimizers use all of it).
      seed: seeds init, shuffling and dropout.
      loss, metric: override the family's defaults (names or callables).
      task: "classification" or "regression"; None: what the loss says
        (`fml.losses.task_of`), else what the targets say (integers classify).
      l2: coefficient of `0.5 * sum(w²)` in the objective; by default the family's
        (`1 / (C n)` for the SVM, else 0).
      l1: coefficient of `sum |w|` (weights, not biases): with optimizer "fista" a
        full-batch FISTA solve to the sparse optimum, else the optimizer's step
        followed by a soft-threshold (`fml.proximal`); with `l2`, elastic net.
      validation: fraction of `(x, y)` held out for validation (arrays only).
      patience: stop when validation loss has not improved for this many epochs,
        and return the best epoch's params (`callbacks.EarlyStopping`; needs
        validation data).
      fused: run each epoch as one `lax.scan` over the data on the device.
      drop_remainder: drop a last partial batch instead of padding it with a mask.
      shuffle: shuffle every epoch (False: the examples in order, as a PyTorch
        `DataLoader(shuffle=False)`).
      clip_norm: clip gradients to this global norm.
      quiet: no progress bar (`callbacks.Progress`).
      state: continue from this `TrainState` instead of a fresh one (for `epochs`
        more epochs, starting mid-epoch if `state.step` is).
      optimizer_kwargs: extra arguments of the optax factory.
      checkpoint_dir: a run directory to checkpoint into (`callbacks.Checkpoint`):
        the whole run state, every `checkpoint_every` steps, every
        `checkpoint_every_epochs` epochs, when training stops and at the end. A new
        run refuses a directory that already holds checkpoints.
      checkpoint_every: steps between checkpoints (None: only at epoch ends).
      checkpoint_every_epochs: epochs between checkpoints (None: only at the end).
      keep: how many of the latest checkpoints to keep (None: all).
      resume: continue the run in `checkpoint_dir` from its latest checkpoint to a
        total of `epochs` epochs, with the same batches, randomness and history as
        if it had never stopped (starts fresh when there is no checkpoint yet).
        Needs the same model, data and trajectory settings; else `CheckpointError`.
      parallel: data parallelism over `devices` (`fml.parallel`): "shard_map" (a
        mesh; spans every process joined by `fml.parallel.initialize`) or "pmap".
        None (default) is off unless several processes have joined, where it means
        "shard_map". `batch_size` stays the global batch; one that does not divide
        by the device count is padded with mask 0. Streams and arrays alike.
      devices: with `parallel`, None for every device, an int `n` for the first
        `n`, or a list of `jax.Device`s.
      tol: full-batch optimizers only: stop once no entry of the gradient at the
        new params exceeds `tol` in absolute value (scikit-learn's `tol` for
        lbfgs, on the same mean objective). None: run all `epochs` iterations.
      callbacks: more `fml.callbacks.Callback`s, run after the built-in ones
        (validation, early stopping, history, progress) and before checkpointing.

    Returns:
      `(state, history)`: the final `TrainState` (on one device) and the per-epoch
      logs (`history["train_loss"][epoch]`, `"val_loss"`, `"epoch_time"`, ...;
      `history["test"]` holds the test metrics when the data has a test split).

    Raises:
      TrainingError: a step's loss became NaN or inf (the message names the step
        and the last good checkpoint, which is kept).
      CheckpointError: a checkpoint cannot be written or does not fit this run.
      ConfigError: bad options, or data these devices and runners cannot take.

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
    splits = inputs.splits(data, validation)
    _check_options(seed=seed, epochs=epochs, batch_size=batch_size, patience=patience,
                   checkpoint_every=checkpoint_every, resume=resume, state=state,
                   checkpoint_every_epochs=checkpoint_every_epochs,
                   checkpoint_dir=checkpoint_dir)  # fmt: skip
    task = inputs.resolve_task(model, loss, task, splits)
    check_arrays(splits.x, splits.y, task=task, where="training data")
    objective = make_objective(model, loss, task)
    make_tx = functools.partial(
        make_optimizer, learning_rate=learning_rate, clip_norm=clip_norm, **(optimizer_kwargs or {})
    )
    optimizer, batch_size = proximal.l1_optimizer(  # L1 as a proximal step
        optimizer, l1, batch_size, splits.num_examples, make_tx
    )
    plan = _plan(splits, optimizer, batch_size, drop_remainder, shuffle, seed, fused, tol)
    tx = make_tx(optimizer)
    l2 = models_lib.l2_strength(model.spec, splits.num_examples) if l2 is None else l2
    l2 = in_range(l2, "l2", 0.0, math.inf)
    if state is None:
        state = init_state(model, tx, splits.x.shape[1:], seed=seed, l2=l2)
    else:
        state = state._replace(hparams={**state.hparams, "l2": jax.numpy.asarray(l2, "float32")})
    inputs.check_data(model, state.params, splits, objective, task)
    dp = None
    if parallel is not None or jax.process_count() > 1:
        dp = parallel_lib.data_parallel(parallel or "shard_map", devices)
    settings = (loss, task, optimizer, learning_rate, clip_norm, optimizer_kwargs, l2 > 0)
    runner = _runner(model, objective, tx, settings, splits, plan, dp)
    checkpoint_cb = None
    if checkpoint_dir is not None:
        trajectory = dict(task=task, optimizer=optimizer, learning_rate=learning_rate,
                          optimizer_kwargs=optimizer_kwargs or {}, clip_norm=clip_norm, loss=loss,
                          l2=float(l2), l1=float(l1), epochs=epochs, patience=patience)  # fmt: skip
        config = checkpoint.fit_config(
            splits.x, splits.y, num_examples=splits.num_examples, **plan._asdict(), **trajectory
        )
        checkpoint_cb = callbacks_lib.Checkpoint(
            checkpoint_dir, optimizer=tx, config=config, every_steps=checkpoint_every,
            every_epochs=checkpoint_every_epochs, keep=keep, resume=resume,
        )  # fmt: skip
    main = jax.process_index() == 0
    options = {"loss": loss, "metric": metric, "task": task}
    run_callbacks = _callbacks(splits, callbacks, patience=patience, quiet=quiet or not main,
                               checkpoint_cb=checkpoint_cb, options=options)  # fmt: skip
    place = dp.replicate if dp else (lambda s: s)
    loop = callbacks_lib.Loop(
        model, runner, place(state), runner.steps_per_epoch, 0, [], main=main, place=place
    )
    train_loop(loop, run_callbacks, epochs=epochs, total=resume)
    history = next(cb for cb in run_callbacks if isinstance(cb, callbacks_lib.History)).history
    if splits.test is not None:
        history["test"] = evaluate(model, loop.state.params, *splits.test, **options)
    return loop.state, history


def _check_options(*, seed, epochs, batch_size, patience, checkpoint_every,
                   checkpoint_every_epochs, resume, state, checkpoint_dir) -> None:  # fmt: skip
    """`ConfigError` for the first of `fit`'s options that is out of range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"expected seed to be an int, got {seed!r}")
    _check_int(epochs, "epochs", 0)
    _check_int(batch_size, "batch_size", 1)
    _check_int(patience, "patience", 0, or_none=True)
    _check_int(checkpoint_every, "checkpoint_every", 1, or_none=True)
    _check_int(checkpoint_every_epochs, "checkpoint_every_epochs", 1, or_none=True)
    if resume and state is not None:
        raise ConfigError("pass either state= or resume=True, not both")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the run to continue")


def _plan(splits: inputs.Splits, optimizer, batch_size, drop_remainder, shuffle, seed, fused, tol):
    """The batching and runner options, a stream's own settings first."""
    stream = splits.stream
    if stream is not None:
        batch_size, drop_remainder = stream.batch_size, stream.drop_remainder
        shuffle, seed = stream.shuffle, stream.seed
    whole = is_full_batch(optimizer)
    if tol is not None:
        if not whole:
            raise ConfigError(f"tol stops full-batch optimizers (lbfgs), not {optimizer!r}")
        tol = in_range(tol, "tol", 0.0, math.inf)
    batch_size = splits.num_examples if whole else batch_size
    batching.check_batching(splits.num_examples, batch_size, drop_remainder)
    batch_size = batching.batch_rows(splits.num_examples, batch_size)
    return Plan(batch_size, drop_remainder, bool(shuffle), seed, fused, whole, tol)


__all__ = [
    "FULL_BATCH_OPTIMIZERS",
    "MAX_ITERATIONS_PER_PROGRAM",
    "OPTIMIZERS",
    "Objective",
    "TrainState",
    "epoch_indices",
    "evaluate",
    "fit",
    "full_batch",
    "init_state",
    "make_epoch",
    "make_full_batch_iterations",
    "make_objective",
    "make_optimizer",
    "make_steps",
    "make_train_step",
    "predict",
    "train_loop",
]
