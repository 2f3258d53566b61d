"""Callbacks: each owns one concern of a training run, through a small protocol.

`fml.fit` runs a loop: it asks every callback where it wants control next
(`next_stop`), runs the runner to the nearest such step, hands the per-step
metrics to every callback (`on_steps`), and at each epoch's end hands them the
epoch's logs (`on_epoch_end`). Any callback may end training by setting
`loop.stop = True`. Events reach the callbacks in list order, `on_train_end` in
reverse order (the last one set up is torn down first).

The protocol (every method optional; `Callback` has no-op defaults):

    on_train_begin(loop)                 set up; `loop.state` is the starting state
    restore(loop) -> dict | None         (checkpointing) load a saved run into `loop`
    next_stop(loop, step) -> int | None  the next global step it needs control at
    on_steps(loop, first_step, metrics)  after steps `first_step..` ran (`{name: [n]}`)
    on_epoch_end(loop, epoch, logs)      logs: `epoch`, `epoch_time`, `train_*`, ...
    on_train_end(loop)                   after the last step (not after an error)
    close()                              always, last: release files and bars
    state_dict() -> dict / load_state_dict(dict)   JSON state saved in checkpoints

The callbacks `fit` builds from its shortcuts: `NanGuard`, `Validation`,
`EarlyStopping` (`patience=`), `History`, `Progress` (unless `quiet=`),
`Checkpoint` (`checkpoint_dir=`). Also here: `TensorBoard`, `CSVLogger`,
`LambdaCallback`.

Example:
  >>> import fml
  >>> class StopAt(fml.callbacks.Callback):
  ...     def next_stop(self, loop, step):
  ...         return 5
  ...     def on_steps(self, loop, first_step, metrics):
  ...         loop.stop = loop.step >= 5
  >>> data = fml.data.load("iris")
  >>> state, _ = fml.fit(fml.models.mlp([8, 3]), data, quiet=True, callbacks=[StopAt()])
  >>> int(state.step)
  5
"""

import contextlib
import csv
import dataclasses
import io
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from fml import batching, checkpoint, lock, rundir
from fml._model import Model
from fml.errors import ConfigError, TrainingError
from fml.inference import evaluate


@dataclasses.dataclass
class Loop:
    """What callbacks see of a running `fit`.

    Attributes:
      model: the model trained.
      runner: the runner moving the state (`fml.runners`).
      state: the current state, laid out for the runner (see `host_state`).
      steps_per_epoch: global steps per epoch.
      end_step: the global step training runs to.
      callbacks: every callback of the run, in order.
      stop: set True to end training after the current chunk of steps.
      start_step: where this `fit` call began (after any restore).
      main: whether this process writes logs and files (process 0).
      epoch_metrics: the current epoch's per-step metrics so far (`{name: [n]}`).
      epoch_time: seconds spent in the current epoch's steps so far.
      on_host: the state was taken off the runner (after training, `on_train_end`).
      place: lays a host state out for the runner (e.g. replicated over devices).
    """

    model: Model
    runner: Any
    state: Any
    steps_per_epoch: int
    end_step: int
    callbacks: list
    stop: bool = False
    start_step: int = 0
    main: bool = True
    epoch_metrics: dict = dataclasses.field(default_factory=dict)
    epoch_time: float = 0.0
    on_host: bool = False
    place: Any = None

    @property
    def step(self) -> int:
        return int(self.host_state().step)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def host_state(self):
        """The state on one device of this process."""
        return self.state if self.on_host else self.runner.local(self.state)

    def find(self, kind) -> list:
        """The run's callbacks of type `kind`."""
        return [cb for cb in self.callbacks if isinstance(cb, kind)]


class Callback:
    """The base: every hook does nothing. Subclass and override what you need."""

    def on_train_begin(self, loop: Loop) -> None:
        del loop

    def restore(self, loop: Loop) -> dict | None:
        del loop
        return None

    def next_stop(self, loop: Loop, step: int) -> int | None:
        del loop, step
        return None

    def on_steps(self, loop: Loop, first_step: int, metrics: dict) -> None:
        del loop, first_step, metrics

    def on_epoch_end(self, loop: Loop, epoch: int, logs: dict) -> None:
        del loop, epoch, logs

    def on_train_end(self, loop: Loop) -> None:
        del loop

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


def next_epoch_end(loop: Loop, step: int) -> int:
    """The global step that ends the epoch after `step`."""
    return (step // loop.steps_per_epoch + 1) * loop.steps_per_epoch


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


# ------------------------------------------------------------------ metrics


class History(Callback):
    """Per-epoch logs: `history["train_loss"][epoch]`, `"val_accuracy"`, `"epoch_time"`, ..."""

    def __init__(self):
        self.history: dict = {}

    def on_train_begin(self, loop):
        self.history = {}

    def on_epoch_end(self, loop, epoch, logs):
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = {k: list(v) for k, v in state["history"].items()}


class NanGuard(Callback):
    """Raises `TrainingError` naming the first step whose loss is NaN or inf, and
    the last good checkpoint (kept)."""

    def on_steps(self, loop, first_step, metrics):
        loss = np.asarray(metrics.get("loss", []))
        bad = np.flatnonzero(~np.isfinite(loss))
        if not bad.size:
            return
        step = first_step + int(bad[0])
        where = "; ".join(cb.describe() for cb in loop.find(Checkpoint)) or (
            "no checkpoint_dir was set"
        )
        raise TrainingError(
            f"loss became {loss[bad[0]]} in step {step + 1} (epoch "
            f"{step // loop.steps_per_epoch}); {where}; lower the learning rate or set clip_norm"
        )


class Validation(Callback):
    """Loss and metric on held-out data after every epoch, as `val_*` logs."""

    def __init__(self, x, y, *, loss=None, metric=None, task: str = "classification"):
        self.x, self.y = x, y
        self.options = {"loss": loss, "metric": metric, "task": task}

    def next_stop(self, loop, step):
        return next_epoch_end(loop, step)

    def on_epoch_end(self, loop, epoch, logs):
        params = loop.host_state().params
        scores = evaluate(loop.model, params, self.x, self.y, **self.options)
        logs.update({f"val_{k}": v for k, v in scores.items()})


class EarlyStopping(Callback):
    """Stops when `monitor` (a log, default "val_loss") has not improved for
    `patience` epochs; the returned state then holds the best epoch's params.

    Raises:
      ConfigError: at the start, when nothing produces `monitor` (no `Validation`).
    """

    def __init__(self, patience: int, *, monitor: str = "val_loss", restore_best: bool = True):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"expected patience to be an int >= 0, got {patience!r}")
        self.patience, self.monitor, self.restore_best = patience, monitor, restore_best
        self.best, self.best_epoch, self.best_params = math.inf, -1, None

    def on_train_begin(self, loop):
        if self.monitor.startswith("val_") and not loop.find(Validation):
            raise ConfigError(
                f"early stopping watches {self.monitor!r}, but this run has no validation "
                "data: pass validation= (a fraction of (x, y)) or a Dataset with a "
                "validation split"
            )
        self.best, self.best_epoch, self.best_params = math.inf, -1, None

    def on_epoch_end(self, loop, epoch, logs):
        value = logs.get(self.monitor)
        if value is None:
            raise ConfigError(f"early stopping: no {self.monitor!r} in the logs {sorted(logs)}")
        if value < self.best:
            self.best, self.best_epoch = value, epoch
            self.best_params = jax.device_get(loop.host_state().params)
        elif epoch - self.best_epoch >= self.patience:
            loop.stop = True

    def on_train_end(self, loop):
        if self.restore_best and self.best_params is not None:
            state = loop.host_state()
            loop.state = state._replace(params=jax.device_put(self.best_params))
            for history in loop.find(History):
                history.history["best_epoch"] = self.best_epoch

    def state_dict(self):
        best = None if self.best_params is None else {"loss": self.best, "epoch": self.best_epoch}
        return {"best": best}

    def load_state_dict(self, state):
        best = state.get("best")
        if best:
            self.best, self.best_epoch = best["loss"], best["epoch"]


# ------------------------------------------------------------------ display and logs


class Progress(Callback):
    """A bar over the run's steps with the running loss; it moves every fraction
    of a second on host-fed runs and once an epoch on fused ones, and stays at the
    end. When the output is not a terminal, one plain line per epoch instead.

    Args:
      file: where to write (default stderr).
      refresh_s: seconds between updates of a host-fed run.
    """

    def __init__(self, *, file=None, refresh_s: float = 0.25):
        self.file, self.refresh_s = file, refresh_s
        self.bar, self.steps_per_s, self.running = None, None, None

    def _stream(self):
        return self.file or sys.stderr

    def on_train_begin(self, loop):
        self.bar, self.steps_per_s, self.running, self.started = None, None, None, None

    def _open(self, loop):
        stream = self._stream()
        if self.bar is None and getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=loop.end_step, initial=loop.step, unit="step", file=stream, leave=True
            )

    def next_stop(self, loop, step):
        if loop.runner.fused or not self.steps_per_s:
            return None
        return step + max(1, int(self.steps_per_s * self.refresh_s))

    def on_steps(self, loop, first_step, metrics):
        now, count = time.perf_counter(), len(metrics.get("loss", ()))
        if self.started is not None and count:
            self.steps_per_s = count / max(now - self.started, 1e-6)
        self.started = now
        if count:
            mean = float(np.mean(metrics["loss"]))
            self.running = mean if self.running is None else 0.9 * self.running + 0.1 * mean
        self._open(loop)
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix(loss=f"{self.running:.4f}", refresh=False)

    def on_epoch_end(self, loop, epoch, logs):
        shown = {k: v for k, v in logs.items() if k.startswith(("train_", "val_"))}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
            return
        values = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        total = -(-loop.end_step // loop.steps_per_epoch)
        print(
            f"epoch {epoch + 1}/{total}  {values}  {logs['epoch_time']:.2f}s",
            file=self._stream(),
            flush=True,
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoard(Callback):
    """TensorBoard event files in `log_dir` (through `tensorboardX`): every step's
    `train/loss` (and accuracy) and every epoch's logs as `epoch/<name>`."""

    def __init__(self, log_dir):
        self.log_dir = pathlib.Path(log_dir)
        self.writer = None

    def on_train_begin(self, loop):
        if loop.main:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def on_steps(self, loop, first_step, metrics):
        if self.writer is None:
            return
        for name, values in metrics.items():
            if name != "count":
                for i, value in enumerate(np.asarray(values)):
                    self.writer.add_scalar(f"train/{name}", float(value), first_step + i + 1)

    def on_epoch_end(self, loop, epoch, logs):
        if self.writer is None:
            return
        for name, value in logs.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", float(value), epoch + 1)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CSVLogger(Callback):
    """The epoch logs as a CSV file, rewritten whole (atomically) after every epoch,
    so a resumed run's file holds each epoch once."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.rows: list[dict] = []

    def on_train_begin(self, loop):
        self.rows = []

    def on_epoch_end(self, loop, epoch, logs):
        self.rows.append(dict(logs))
        if loop.main:
            columns = list(dict.fromkeys(k for row in self.rows for k in row))
            text = io.StringIO()
            writer = csv.DictWriter(text, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rundir.atomic_write(self.path, text.getvalue().encode())

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = [dict(row) for row in state["rows"]]


class LambdaCallback(Callback):
    """A callback from plain functions: `LambdaCallback(on_epoch_end=lambda loop, epoch,
    logs: ...)`; any hook of the protocol may be given."""

    def __init__(self, **hooks):
        known = {"on_train_begin", "next_stop", "on_steps", "on_epoch_end", "on_train_end"}
        unknown_hooks = sorted(set(hooks) - known)
        if unknown_hooks:
            raise ConfigError(f"expected hooks among {sorted(known)}, got {unknown_hooks}")
        for name, hook in hooks.items():
            setattr(self, name, hook)


# ------------------------------------------------------------------ checkpoints


class Checkpoint(Callback):
    """Checkpoints the whole run with orbax (`fml.checkpoint`): the train state, the
    state of every callback and of the loop (the data position is the step), every
    `every_steps` steps, every `every_epochs` epochs, when training stops, and at
    the end. With `resume`, `restore` continues the run from its latest checkpoint.

    Args:
      run_dir: the run directory.
      optimizer: the run's optax optimizer (to rebuild the saved state's layout).
      config: the run's JSON config (`fml.checkpoint.fit_config`); a resume must match it.
      every_steps, every_epochs: when to save (None: not by that measure).
      keep: how many latest checkpoints to keep (None: all).
      resume: continue the run found in `run_dir` (a new run refuses one).
    """

    def __init__(
        self,
        run_dir,
        *,
        optimizer,
        config: dict,
        every_steps: int | None = None,
        every_epochs: int | None = 1,
        keep: int | None = 3,
        resume: bool = False,
    ):
        for name, every in (
            ("checkpoint_every", every_steps),
            ("checkpoint_every_epochs", every_epochs),
        ):
            if every is not None and (
                isinstance(every, bool) or not isinstance(every, int) or every < 1
            ):
                raise ConfigError(f"expected {name} to be a positive int or None, got {every!r}")
        self.run_dir, self.optimizer, self.config = run_dir, optimizer, config
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.keep, self.resume = keep, resume
        self.checkpointer, self.lock = None, None

    def describe(self) -> str:
        if self.checkpointer is None:
            return "no checkpoint was saved"
        return self.checkpointer.describe_latest()

    def on_train_begin(self, loop):
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, keep=self.keep)
        self.lock = contextlib.ExitStack()  # one writer of the run directory at a time
        self.lock.enter_context(lock.run_lock(self.run_dir, writer=loop.main))

    def restore(self, loop):
        restored = self.checkpointer.start(
            loop.model, self.optimizer, self.config, resume=self.resume
        )
        if restored is None:
            return None
        saved = restored.meta.get("callbacks", {})
        for cb in loop.find(EarlyStopping):
            cb.best_params = restored.best_params
        return {"state": restored.state, "callbacks": saved, "loop": restored.meta.get("loop", {})}

    def next_stop(self, loop, step):
        stops = []
        if self.every_steps:
            stops.append(_next_multiple(step, self.every_steps))
        if self.every_epochs:
            stops.append(_next_multiple(step, self.every_epochs * loop.steps_per_epoch))
        return min(stops) if stops else None

    def on_steps(self, loop, first_step, metrics):
        step = loop.step
        if self.every_steps and step % self.every_steps == 0 and step % loop.steps_per_epoch:
            self.save(loop)

    def on_epoch_end(self, loop, epoch, logs):
        step = loop.step
        if step != (epoch + 1) * loop.steps_per_epoch:
            return  # a later epoch of the same chunk (full batch) ends where the state is
        due = (self.every_epochs and (epoch + 1) % self.every_epochs == 0) or (
            self.every_steps and step % self.every_steps == 0
        )
        if due or loop.stop or step >= loop.end_step:
            self.save(loop)

    def on_train_end(self, loop):
        self.save(loop)

    def close(self):
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def save(self, loop) -> None:
        """Saves the run as it stands (a no-op when this step is saved already)."""
        state = loop.host_state()
        step = int(state.step)
        states = {name: cb.state_dict() for name, cb in callback_names(loop.callbacks).items()}
        best = [cb.best_params for cb in loop.find(EarlyStopping) if cb.best_params is not None]
        meta = {
            "spec": loop.model.spec,
            "config": self.config,
            "position": dict(
                zip(
                    ("epoch", "step_in_epoch"),
                    batching.position(step, loop.steps_per_epoch),
                    strict=True,
                )
            ),
            "history": next((h.history for h in loop.find(History)), {}),
            "callbacks": states,
            "loop": loop_state(loop),
            "stopped": loop.stop,
        }
        self.checkpointer.save(state, meta, best_params=best[0] if best else None)


def callback_names(callbacks) -> dict:
    """Stable names of a run's callbacks (their class, numbered when repeated)."""
    names, seen = {}, {}
    for cb in callbacks:
        kind = type(cb).__name__
        seen[kind] = seen.get(kind, 0) + 1
        names[kind if seen[kind] == 1 else f"{kind}{seen[kind]}"] = cb
    return names


def loop_state(loop: Loop) -> dict:
    """The loop's own part of a checkpoint: this epoch's per-step metrics so far."""
    return {"epoch_metrics": {k: np.asarray(v).tolist() for k, v in loop.epoch_metrics.items()}}
