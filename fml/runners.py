"""Runners: what moves a `TrainState` from one global step to another.

Every runner has one interface,

    runner.run(state, from_step, to_step) -> (state, metrics)

where `metrics` are the per-step values on the host (`{name: [n]}`), one row per
step taken. A full-batch runner may take fewer steps than asked when the
optimizer converged (`n < to_step - from_step`). The batches are those of
`fml.batching` for `(seed, epoch)`, so any split of a run into `run` calls takes
the same steps as one call.

- `HostRunner`: jitted steps fed batch by batch from a stream (arrays in
  memory or a source on disk), prefetched and placed by the stream.
- `FusedRunner`: the data on the device, each epoch one `lax.scan` program.
- `GatheredRunner`: each epoch's batches gathered on the host in batch order and
  placed (for data parallelism, each device only its rows of every batch), each
  epoch one `lax.scan` program.
- `FullBatchRunner`: full-batch iterations (lbfgs) in one `lax.while_loop`.

`fml.parallel` builds the same runners around per-replica programs.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fml import batching
from fml.step import MAX_ITERATIONS_PER_PROGRAM


def epoch_segments(from_step: int, to_step: int, steps_in_epoch: int) -> Iterator:
    """`(epoch, begin, end)` pieces of the global steps `from_step..to_step-1`, one per epoch."""
    step = from_step
    while step < to_step:
        epoch, begin = batching.position(step, steps_in_epoch)
        end = min(steps_in_epoch, begin + to_step - step)
        yield epoch, begin, end
        step += end - begin


def stack_metrics(chunks: list) -> dict:
    """Per-step metrics of consecutive chunks, joined on the host: `{name: [steps]}`."""
    chunks = [c for c in chunks if c]
    if not chunks:
        return {}
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in chunks[0]}


def _identity(tree):
    return tree


@dataclasses.dataclass
class HostRunner:
    """Jitted steps over the batches of `stream` (an `fml.data.BatchStream` or any
    object with `batches(epoch, begin, end, *, put)`), placed by `put`.

    Attributes:
      step: the compiled `step(state, batch) -> (state, metrics)`.
      stream: where the batches come from.
      steps_per_epoch: global steps per epoch.
      put: places one host batch for `step` (None: the stream's own placement).
      local: this process's view of a tree the step returned (metrics, state).
    """

    step: Callable
    stream: Any
    steps_per_epoch: int
    put: Callable | None = None
    local: Callable = _identity
    fused = False

    def run(self, state, from_step: int, to_step: int):
        per_step = []
        for epoch, begin, end in epoch_segments(from_step, to_step, self.steps_per_epoch):
            for batch in self.stream.batches(epoch, begin, end, put=self.put):
                state, metrics = self.step(state, batch)
                per_step.append(self.local(metrics))
        if not per_step:
            return state, {}
        return state, jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *per_step))


@dataclasses.dataclass(kw_only=True)
class EpochOrder:
    """The batch order of a runner that draws its batches from `fml.batching`.

    Attributes:
      num_examples, batch_size, drop_remainder, shuffle, seed: as `fml.batching`'s.
    """

    num_examples: int
    batch_size: int
    drop_remainder: bool
    shuffle: bool
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return batching.steps_per_epoch(self.num_examples, self.batch_size, self.drop_remainder)


@dataclasses.dataclass
class FusedRunner(EpochOrder):
    """Epochs over on-device `(x, y)` as one program each (`make_epoch`); a part of
    an epoch as one scan over its batches (`make_steps`).

    Attributes:
      run_epoch: the compiled `epoch(state, x, y, key) -> (state, metrics)`.
      run_steps: the compiled `steps(state, x, y, index_SxB, mask_SxB)`.
      x, y: the training data, placed for the programs.
      place: places a key or a plan for the programs.
      local: this process's view of the returned metrics.
    """

    run_epoch: Callable
    run_steps: Callable
    x: Any
    y: Any
    place: Callable = _identity
    local: Callable = _identity
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)
    fused = True

    def _plan(self, epoch: int):
        """The epoch's `(index_SxB, mask_SxB)` on the host (the last one is kept)."""
        if epoch not in self._plans:
            key = batching.epoch_key(self.seed, epoch)
            plan = batching.epoch_indices(
                key, self.num_examples, self.batch_size, self.drop_remainder, shuffle=self.shuffle
            )
            self._plans = {epoch: jax.device_get(plan)}
        return self._plans[epoch]

    def run(self, state, from_step: int, to_step: int):
        chunks = []
        for epoch, begin, end in epoch_segments(from_step, to_step, self.steps_per_epoch):
            if (begin, end) == (0, self.steps_per_epoch):
                key = self.place(batching.epoch_key(self.seed, epoch))
                state, metrics = self.run_epoch(state, self.x, self.y, key)
            else:
                plan = self.place(tuple(a[begin:end] for a in self._plan(epoch)))
                state, metrics = self.run_steps(state, self.x, self.y, *plan)
            chunks.append(jax.device_get(self.local(metrics)))
        return state, stack_metrics(chunks)


@dataclasses.dataclass
class GatheredRunner(EpochOrder):
    """Epochs whose batches `fml.batching` draws on the host, gathered there from
    `(x, y)` in batch order, placed by `put` and run as one program each
    (`make_batch_scan`). The devices hold one epoch's batches at a time, never
    the whole data set: under data parallelism each device holds only its columns
    of every batch (1 / devices of the data), at the cost of one host-to-device
    copy of the data per epoch.

    As `make_epoch`, a batch that holds every example is taken unshuffled.

    Attributes:
      run_batches: the compiled `scan(state, x_SxB, y_SxB, mask_SxB)`.
      x, y: the training data on the host.
      put: places this process's `(x_SxB, y_SxB, mask_SxB)` for `run_batches`.
      local: this process's view of the returned metrics.
      process_index, process_count: which columns of every global batch this
        process gathers (`fml.batching.process_columns`).
      columns_multiple: this process's columns are padded (index 0, mask 0) to a
        multiple of it (its device count).
    """

    run_batches: Callable
    x: Any
    y: Any
    put: Callable = _identity
    local: Callable = _identity
    process_index: int = 0
    process_count: int = 1
    columns_multiple: int = 1
    fused = True

    def batches(self, epoch: int, begin: int, end: int):
        """Steps `begin..end-1` of `epoch`: this process's columns of their batches, placed."""
        index_SxB, mask_SxB = batching.epoch_plan(
            self.seed,
            epoch,
            self.num_examples,
            self.batch_size,
            drop_remainder=self.drop_remainder,
            shuffle=self.shuffle and self.num_examples > self.batch_size,
            begin=begin,
            end=end,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        index_SxB, mask_SxB = batching.pad_columns(index_SxB, mask_SxB, self.columns_multiple)
        return self.put((self.x[index_SxB], self.y[index_SxB], mask_SxB))

    def run(self, state, from_step: int, to_step: int):
        chunks = []
        for epoch, begin, end in epoch_segments(from_step, to_step, self.steps_per_epoch):
            state, metrics = self.run_batches(state, *self.batches(epoch, begin, end))
            chunks.append(jax.device_get(self.local(metrics)))
        return state, stack_metrics(chunks)


@dataclasses.dataclass
class FullBatchRunner:
    """Full-batch steps (one per epoch) on the whole of on-device `(x, y)`, as many
    as asked in one `lax.while_loop` program, stopping early at `tol`.

    Attributes:
      iterations: the compiled `make_full_batch_iterations` program.
      x, y, mask: the training data on the device (for data parallelism, each
        device its rows; padding rows have mask 0).
      tol: stop once no gradient entry exceeds it (None: never).
      place: places the iteration count and `tol` for the program.
      local: this process's view of a tree the program returned.
    """

    iterations: Callable
    x: Any
    y: Any
    mask: Any
    tol: float | None = None
    place: Callable = _identity
    local: Callable = _identity
    steps_per_epoch = 1
    fused = True

    def run(self, state, from_step: int, to_step: int):
        chunks, step = [], from_step
        tol = -1.0 if self.tol is None else self.tol
        while step < to_step:
            num = min(to_step - step, MAX_ITERATIONS_PER_PROGRAM)
            capacity = min(1 << (num - 1).bit_length(), MAX_ITERATIONS_PER_PROGRAM)
            limits = self.place((jnp.asarray(num, jnp.int32), jnp.asarray(tol, jnp.float32)))
            state, buffers, ran, converged = self.iterations(
                state, self.x, self.y, self.mask, *limits, capacity=capacity
            )
            ran, converged, buffers = jax.device_get(self.local((ran, converged, buffers)))
            chunks.append({k: v[:ran] for k, v in buffers.items()})
            step += int(ran)
            if converged:
                break
        return state, stack_metrics(chunks)
