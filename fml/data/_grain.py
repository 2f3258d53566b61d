"""Streams on Grain: fml's batch order, read and decoded by Grain worker processes.

The global batch `s` of epoch `e` is row `s` of THE batch plan
`fml.batching.epoch_plan(seed, e, ...)`, as for arrays in memory; Grain does the reading:
a `grain.MapDataset` over the run's global steps whose element `g = e * S + s`
reads this process's columns of that row from the source, `.to_iter_dataset()`,
`.mp_prefetch()` worker processes for decoding (each computes the plan of the
epochs it reads), then a thread placing batches on the device ahead of the step.
Grain's own samplers and shuffles are not used, so the batches are those of the
same data in memory, on any number of hosts and workers, and a run resumed at
(epoch, step) reads exactly the batches it would have read.
"""

import functools
import itertools
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from fml import batching
from fml.data._stream import BatchStream, Source, prefetch
from fml.errors import ConfigError, DataError, require

# Steps ahead a stream with no epoch count reads up to (Grain wants a finite range).
_OPEN_ENDED_STEPS = 1 << 40


def _grain():
    grain = require("grain", "data")
    flags = require("absl.flags", "data")
    if not flags.FLAGS.is_parsed():
        # Grain's workers read absl flags; outside an absl app nobody parsed them.
        flags.FLAGS.mark_as_parsed()
    return grain


class _Plan:
    """This process's columns of each step's row of THE batch plan
    (`fml.batching.epoch_plan`), the last epoch's cached."""

    def __init__(self, stream: BatchStream):
        self.args = (stream.seed, len(stream.source), stream.batch_size)
        self.options = dict(
            drop_remainder=stream.drop_remainder,
            shuffle=stream.shuffle,
            process_index=stream.process_index,
            process_count=stream.process_count,
        )
        self._epoch, self._rows = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_epoch": None, "_rows": None}

    def row(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._epoch:
            seed, num_examples, batch_size = self.args
            self._rows = batching.epoch_plan(seed, epoch, num_examples, batch_size, **self.options)
            self._epoch = epoch
        index_SxB, mask_SxB = self._rows
        return index_SxB[step], mask_SxB[step]


class _ReadStep:
    """Grain's map function: global step `g` -> the host batch `{"x", "y", "mask"}`."""

    def __init__(self, source: Source, plan: _Plan, steps_per_epoch: int):
        self.source, self.plan, self.steps_per_epoch = source, plan, steps_per_epoch

    def __call__(self, g: int) -> dict:
        index_B, mask_B = self.plan.row(*divmod(int(g), self.steps_per_epoch))
        return {**self.source.read(index_B), "mask": mask_B}


def _start_worker(pid_dir: str, worker_index: int, worker_count: int) -> None:
    """Grain worker init: the plan is computed with JAX on the CPU, never an
    accelerator; the worker's pid goes to `pid_dir` so the stream can stop it, and
    the worker exits when its parent dies (a SIGKILLed run leaves no orphans)."""
    del worker_index, worker_count
    jax.config.update("jax_platforms", "cpu")
    with open(os.path.join(pid_dir, str(os.getpid())), "w"):
        pass
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _terminate_workers(pid_dir: str) -> None:
    """Terminates this process's children whose pids are in `pid_dir`: a worker
    blocked in a read would otherwise hold Grain's close (it joins its threads)."""
    pids = {int(name) for name in os.listdir(pid_dir)}
    workers = [p for p in multiprocessing.active_children() if p.pid in pids]
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=10)


def _died(error: Exception) -> bool:
    return isinstance(error, RuntimeError) and "terminated unexpectedly" in str(error)


class GrainStream(BatchStream):
    """A `BatchStream` whose batches Grain reads, in worker processes when `workers > 0`.

    Same batches, positions, shards and options as `BatchStream` (see there), plus:

    Args:
      workers: Grain worker processes decoding batches (0: read in this process).
        Each worker holds its own copy of the source (its caches) and imports JAX
        (on the CPU) to compute the plan of the epochs it reads.
      prefetch: batches each worker reads ahead, and batches placed on the device
        ahead of the step (0: none).
      shuffle: False reads the examples in order.
    """

    def __init__(self, source: Source, *, workers: int = 0, **kwargs):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"expected workers to be an int >= 0, got {workers!r}")
        super().__init__(source, **kwargs)
        self.workers = workers
        self._iterator, self._next_step, self._pid_dir = None, None, None

    @functools.cached_property
    def _read_step(self) -> _ReadStep:
        return _ReadStep(self.source, _Plan(self), self.steps_per_epoch)

    def _stop(self, first: int) -> int:
        """The global step after the last one a pipeline started at `first` reads."""
        if self.epochs is None:
            return first + _OPEN_ENDED_STEPS
        return max(self.epochs * self.steps_per_epoch, first + 1)

    def _dataset(self, first: int):
        """Grain's pipeline of the host batches of global steps `first, first + 1, ...`."""
        grain = _grain()
        buffer = max(self.prefetch, 1)
        ds = grain.MapDataset.range(first, self._stop(first)).map(self._read_step)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            options = grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=buffer
            )
            self._pid_dir = tempfile.mkdtemp(prefix="fml-grain-workers-")
            ds = ds.mp_prefetch(
                options, worker_init_fn=functools.partial(_start_worker, self._pid_dir)
            )
        return ds

    def _host_batches(self, first: int, count: int) -> Iterator[dict]:
        """`count` host batches from global step `first`, continuing the open Grain
        iterator when it stands there (workers stay up across epochs and calls)."""
        if self._iterator is None or self._next_step != first:
            self.close()
            self._iterator, self._next_step = iter(self._dataset(first)), first
            self._pipeline_stop = self._stop(first)
        for _ in range(count):
            try:
                batch = next(self._iterator)
            except Exception as e:
                self.close()
                if _died(e):
                    raise DataError(
                        f"a Grain input worker process died before global step {self._next_step} "
                        f"was read ({e}); rerun, or resume from the last checkpoint"
                    ) from None
                raise
            self._next_step += 1
            # Copy out of Grain's shared memory (unlinked as its arrays go), so no
            # device buffer can alias memory that a worker hands back.
            yield {k: np.array(v) for k, v in batch.items()} if self.workers else batch
        if self._next_step == self._pipeline_stop:
            self.close()  # the pipeline is exhausted: let its workers go

    def batches(
        self, epoch: int, begin: int = 0, end: int | None = None, *, put: Callable | None = None
    ) -> Iterator:
        """The batches of steps `begin..end-1` of `epoch`, this process's columns,
        placed by `put` (default: the stream's own); `position` is left alone."""
        end = self.steps_per_epoch if end is None else end
        if not 0 <= begin <= end <= self.steps_per_epoch:
            raise ConfigError(
                f"expected steps 0 <= begin <= end <= {self.steps_per_epoch}, got {begin}, {end}"
            )
        host = self._host_batches(epoch * self.steps_per_epoch + begin, end - begin)
        return prefetch(host, put or self.put, size=self.prefetch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        return self.batches(epoch, start_step, self.steps_per_epoch, put=lambda b: b)

    def __iter__(self) -> Iterator[dict]:
        first, step = self.position
        epochs = itertools.count(first) if self.epochs is None else range(first, self.epochs)
        for epoch in epochs:
            for batch in self.batches(epoch, step, self.steps_per_epoch, put=self.put):
                step += 1
                self.position = self.position._make(
                    (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)
                )
                yield batch
            step = 0

    def close(self) -> None:
        """Stops the Grain workers (a later read starts them again)."""
        iterator, self._iterator = self._iterator, None
        pid_dir, self._pid_dir = self._pid_dir, None
        if pid_dir is not None:
            _terminate_workers(pid_dir)
            shutil.rmtree(pid_dir, ignore_errors=True)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()

    def __del__(self):
        try:  # noqa: SIM105 (at interpreter exit modules may be torn down)
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_iterator": None, "_next_step": None, "_pid_dir": None}

    def __repr__(self) -> str:
        return super().__repr__().replace("BatchStream(", "GrainStream(", 1)[:-1] + (
            f", workers={self.workers})"
        )


def stream(
    source: Source,
    *,
    batch_size: int,
    seed: int = 0,
    drop_remainder: bool = False,
    shuffle: bool = True,
    workers: int = 0,
    prefetch: int = 2,
    **kwargs,
) -> GrainStream:
    """The stream `fml.fit` trains on, read by Grain.

    Args:
      source: an in-memory `ArraySource`, `npy_source(...)`, `parquet_source(...)`,
        `tfds_source(...)` (ArrayRecord), or any picklable object with `__len__`
        and `read(index_B) -> {"x", "y"}`.
      batch_size: the global batch size (over all processes).
      seed: seeds the batch order: epoch `e` is `fml.batching.epoch_plan(seed, e,
        ...)`, as `fit` orders arrays in memory.
      drop_remainder: drop the last partial batch; else pad it with mask-0 rows.
      shuffle: False reads the examples in order.
      workers: Grain worker processes reading and decoding batches (0: this process).
      prefetch: batches read ahead per worker and placed on the device ahead.
      **kwargs: `BatchStream`'s `epochs`, `position`, `process_index`,
        `process_count`, `sharding`, `put`.

    Example:
      >>> import numpy as np, fml
      >>> source = fml.data.ArraySource(np.zeros((10, 3), np.float32), np.arange(10))
      >>> [int(b["mask"].sum()) for b in fml.data.stream(source, batch_size=4, epochs=1)]
      [4, 4, 2]
    """
    return GrainStream(
        source,
        batch_size=batch_size,
        seed=seed,
        drop_remainder=drop_remainder,
        shuffle=shuffle,
        workers=workers,
        prefetch=prefetch,
        **kwargs,
    )
