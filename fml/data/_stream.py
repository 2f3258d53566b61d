"""A streaming input pipeline: seeded shuffled batches from a random-access source,
sharded per process, prefetched to the device, resumable at any (epoch, step).

The batches of an epoch are `fml.batching.epoch_plan`'s: the global batch `s` is
row `s` of the epoch's index matrix, and each process reads only its columns of
it (`fml.batching.process_columns`). So the processes' shards are disjoint,
together cover each example once per epoch, and a run on many hosts sees the
same global batches as a run on one.
"""

import collections
import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

import jax
import numpy as np

from fml import batching
from fml.data._embedded import as_array
from fml.data._options import check_stream_options
from fml.errors import ConfigError, ShapeError


class Source(Protocol):
    """Random-access examples: `len(source)` and `source.read(index_B) -> {"x", "y"}`."""

    def __len__(self) -> int: ...

    def read(self, index_B: np.ndarray) -> dict: ...


class ArraySource:
    """In-memory arrays as a `Source`: `read` gathers rows `x[index_B]`, `y[index_B]`."""

    def __init__(self, x, y):
        self.x, self.y = as_array(x, "x", "source"), as_array(y, "y", "source")
        if self.x.ndim == 0:
            raise ShapeError(f"expected x of shape (N, ...), got a scalar of shape {self.x.shape}")
        if self.x.shape[:1] != self.y.shape[:1]:
            raise ShapeError(
                f"expected y with {self.x.shape[0]} rows like x, got y of shape {self.y.shape}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def read(self, index_B: np.ndarray) -> dict:
        return {"x": self.x[index_B], "y": self.y[index_B]}


class Position(NamedTuple):
    """Where a stream stands: the next batch it yields is step `step` of epoch `epoch`."""

    epoch: int = 0
    step: int = 0


def read_batch(source: Source, index_B: np.ndarray, mask_B: np.ndarray) -> dict:
    """The host batch `{"x", "y", "mask"}` of rows `index_B` of `source`."""
    return {**source.read(index_B), "mask": mask_B}


def prefetch(items: Iterable, work: Callable, *, size: int = 2, workers: int = 1) -> Iterator:
    """Yields `work(item)` for each item in order, computed `size` items ahead by
    `workers` background threads.

    With `work` reading a batch and placing it on the device and `size=2`, the
    next batch is read and copied while the current step runs (double buffering);
    reads that release the GIL (TFDS decoding, numpy gathers) overlap across
    `workers`. `size=0` works in the caller's thread. Errors are raised here.
    """
    if size == 0:
        yield from map(work, items)
        return
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fml-input")
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Also when the consumer stops early: drop what is queued, don't wait. At
        # interpreter exit the executor's modules may be torn down: nothing to do then.
        try:  # noqa: SIM105 (contextlib may be torn down at exit too)
            pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


def global_batch_put(sharding: jax.sharding.Sharding, global_batch_size: int) -> Callable:
    """A `put` assembling each process's local batch into one global array.

    Every leaf `[B_local, ...]` becomes a `jax.Array` of shape `[global_batch_size, ...]`
    laid out by `sharding` (e.g. `NamedSharding(mesh, P("data"))`) with
    `jax.make_array_from_process_local_data`.
    """

    def put(batch: dict) -> dict:
        return {
            k: jax.make_array_from_process_local_data(
                sharding, v, (global_batch_size, *np.shape(v)[1:])
            )
            for k, v in batch.items()
        }

    return put


class BatchStream:
    """Shuffled, batched, prefetched batches `{"x", "y", "mask"}` over epochs.

    Deterministic for a given `seed`: epoch `e` uses the batches of
    `fml.batching.epoch_plan(seed, e, len(source), batch_size, ...)` (the same as
    `fml.fit` on arrays). `position` is the (epoch, step) of the next batch;
    save it (`position._asdict()`) and pass it back as `position=` to resume
    with exactly the batches the run would have seen.

    Args:
      source: an `ArraySource`, a `fml.data.tfds_source(...)`, or any object with
        `__len__` and `read(index_B) -> {"x", "y"}`.
      batch_size: the global batch size (over all processes).
      seed: seeds the shuffling.
      drop_remainder: drop the last partial batch of an epoch; else pad it with
        index-0 rows of mask 0, which `fml`'s train step leaves out of the loss.
      shuffle: shuffle each epoch (False: the examples in order).
      epochs: stop after this epoch count (from epoch 0); None runs forever.
      position: where to start, a `Position` or an `(epoch, step)` pair.
      process_index, process_count: this process's shard; by default
        `jax.process_index()` and `jax.process_count()`.
      prefetch: batches read and placed ahead by background threads (0: none).
      workers: threads reading batches in parallel (for sources whose reads
        release the GIL, like TFDS decoding); the order stays the same.
      sharding: when given, local batches are assembled into global arrays laid
        out by it (`global_batch_put`); otherwise `jax.device_put` to the default
        device. Pass `put=` instead to place batches yourself (e.g. `lambda b: b`).

    Example:
      >>> import numpy as np, fml
      >>> source = fml.data.ArraySource(np.zeros((10, 3), np.float32), np.arange(10))
      >>> stream = fml.data.BatchStream(source, batch_size=4, seed=0, epochs=1)
      >>> [int(b["mask"].sum()) for b in stream]
      [4, 4, 2]
      >>> stream.position
      Position(epoch=1, step=0)
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        seed: int = 0,
        drop_remainder: bool = False,
        shuffle: bool = True,
        epochs: int | None = None,
        position: tuple[int, int] = (0, 0),
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        workers: int = 1,
        sharding: jax.sharding.Sharding | None = None,
        put: Callable | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"expected batch_size to be a positive int, got {batch_size!r}")
        check_stream_options(
            source, seed=seed, drop_remainder=drop_remainder, epochs=epochs, position=position,
            process_index=process_index, process_count=process_count, prefetch=prefetch,
            workers=workers,
        )  # fmt: skip
        batching.check_batching(len(source), batch_size, drop_remainder)
        if prefetch < 0 or workers < 1:
            raise ConfigError(f"expected prefetch >= 0 and workers >= 1, got {prefetch}, {workers}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.shuffle = bool(shuffle)
        self.epochs = epochs
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        batching.process_columns(batch_size, self.process_index, self.process_count)
        self.prefetch, self.workers = prefetch, workers
        if put is None:
            put = jax.device_put if sharding is None else global_batch_put(sharding, batch_size)
        self.put = put
        self.position = self._checked(Position(*position))

    @property
    def steps_per_epoch(self) -> int:
        return batching.steps_per_epoch(len(self.source), self.batch_size, self.drop_remainder)

    def _checked(self, position: Position) -> Position:
        if position.epoch < 0 or not 0 <= position.step < self.steps_per_epoch:
            raise ConfigError(
                f"expected a position with epoch >= 0 and step in [0, "
                f"{self.steps_per_epoch}), got {tuple(position)}"
            )
        return position

    def _epoch_plan(self, epoch: int, start_step: int = 0, stop_step: int | None = None):
        index_SxB, mask_SxB = batching.epoch_plan(
            self.seed,
            epoch,
            len(self.source),
            self.batch_size,
            drop_remainder=self.drop_remainder,
            shuffle=self.shuffle,
            begin=start_step,
            end=stop_step,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        return zip(index_SxB, mask_SxB)

    def _read_and_put(self, plan_item, put=None) -> dict:
        index_B, mask_B = plan_item
        return (put or self.put)(read_batch(self.source, index_B, mask_B))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """This process's host batches of one epoch (read lazily, not placed)."""
        return (read_batch(self.source, i, m) for i, m in self._epoch_plan(epoch, start_step))

    def batches(
        self, epoch: int, begin: int = 0, end: int | None = None, *, put: Callable | None = None
    ) -> Iterator[dict]:
        """This process's batches of steps `begin..end-1` of one epoch, prefetched and
        placed by `put` (default: the stream's own); `position` is left alone (what
        `fml.fit`'s runners read)."""
        plan = self._epoch_plan(epoch, begin, end)
        work = functools.partial(self._read_and_put, put=put)
        return prefetch(plan, work, size=self.prefetch, workers=self.workers)

    def device_batches(self, epoch: int, begin: int = 0, end: int | None = None) -> Iterator[dict]:
        """`batches(epoch, begin, end)` placed by the stream's own `put`."""
        return self.batches(epoch, begin, end)

    def _plan(self, start: Position) -> Iterator[tuple[Position, tuple]]:
        """(position after, plan item) of every step from `start` on."""
        epoch, step = start
        while self.epochs is None or epoch < self.epochs:
            for item in self._epoch_plan(epoch, step):
                step += 1
                if step == self.steps_per_epoch:
                    epoch, step = epoch + 1, 0
                yield Position(epoch, step), item
            step = 0

    def __iter__(self) -> Iterator[dict]:
        """Batches from `position` on; `position` advances as each is handed out."""

        def work(planned):
            after, item = planned
            return after, self._read_and_put(item)

        planned = self._plan(self.position)
        for after, batch in prefetch(planned, work, size=self.prefetch, workers=self.workers):
            self.position = after
            yield batch

    def __repr__(self) -> str:
        return (
            f"BatchStream({len(self.source)} examples, batch_size={self.batch_size}, "
            f"seed={self.seed}, drop_remainder={self.drop_remainder}, shuffle={self.shuffle}, "
            f"shard={self.process_index}/{self.process_count}, position={tuple(self.position)})"
        )
