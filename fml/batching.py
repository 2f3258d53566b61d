"""The batch order: its one definition, which arrays, streams, sweeps, data
parallelism and resume all call.

Epoch `e` of a run with seed `s` visits the examples in the order
`permutation(epoch_key(s, e), n)` (or `0..n-1` unshuffled), cut into
`steps_per_epoch` global batches of `batch_size` rows. A last partial batch is
dropped, or padded with index-0 rows of mask 0, which the train step leaves
out of the loss, gradients and metrics. A batch never holds more rows than the
data: `batch_size` larger than `n` trains on batches of `n`.

Process `p` of `P` reads only its columns of every global batch
(`process_columns`), so a run on many hosts sees the same global batches as a
run on one, and together the processes read each example once per epoch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fml.errors import ConfigError


def epoch_key(seed: int, epoch) -> jax.Array:
    """The shuffling key of `epoch`: `fold_in(fold_in(key(seed), 1), epoch)`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def batch_rows(num_examples: int, batch_size: int) -> int:
    """The rows of a batch: `batch_size`, but never more than the data holds."""
    return max(1, min(batch_size, num_examples))


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Global batches per epoch."""
    rows = batch_rows(num_examples, batch_size)
    return num_examples // rows if drop_remainder else -(-num_examples // rows)


def check_batching(num_examples: int, batch_size: int, drop_remainder: bool) -> None:
    """Raises `ConfigError` when these settings leave no batch to train on."""
    if num_examples < 1:
        raise ConfigError("expected at least one example, got 0")
    if drop_remainder and batch_size > num_examples:
        raise ConfigError(
            f"batch_size {batch_size} > {num_examples} examples with drop_remainder leaves no batch"
        )


def epoch_indices(
    key, num_examples: int, batch_size: int, drop_remainder: bool = False, *, shuffle: bool = True
):
    """The example indices `[S, B]` and mask `[S, B]` of one epoch.

    Traceable (under `jit`, with `key` traced); `num_examples` and `batch_size`
    are static. Unshuffled (`shuffle=False`), the epoch visits `0..n-1` in order.
    """
    check_batching(num_examples, batch_size, drop_remainder)
    rows = batch_rows(num_examples, batch_size)
    steps = steps_per_epoch(num_examples, batch_size, drop_remainder)
    order = jax.random.permutation(key, num_examples) if shuffle else jnp.arange(num_examples)
    pad = steps * rows - num_examples
    if pad > 0:
        order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    order = order[: steps * rows]
    mask = (jnp.arange(steps * rows) < num_examples).astype(jnp.float32)
    return order.reshape(steps, rows), mask.reshape(steps, rows)


def process_columns(batch_size: int, process_index: int, process_count: int) -> slice:
    """The columns of each (column-padded) global batch that process `process_index` reads."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"expected process_index in [0, {process_count}), got {process_index}")
    local = -(-batch_size // process_count)
    return slice(process_index * local, (process_index + 1) * local)


def pad_columns(index_SxB: np.ndarray, mask_SxB: np.ndarray, multiple: int):
    """Pads the batches' columns to a multiple of `multiple` with index 0, mask 0."""
    extra = -index_SxB.shape[1] % multiple
    if not extra:
        return index_SxB, mask_SxB
    widths = ((0, 0), (0, extra))
    return np.pad(index_SxB, widths), np.pad(mask_SxB, widths)


def epoch_plan(
    seed: int,
    epoch: int,
    num_examples: int,
    batch_size: int,
    *,
    drop_remainder: bool = False,
    shuffle: bool = True,
    begin: int = 0,
    end: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's `(index_SxB, mask_SxB)` of steps `begin..end-1` of an epoch,
    as numpy arrays: the rows of `epoch_indices`, restricted to its columns."""
    index_SxB, mask_SxB = jax.device_get(
        epoch_indices(
            epoch_key(seed, epoch), num_examples, batch_size, drop_remainder, shuffle=shuffle
        )
    )
    index_SxB, mask_SxB = pad_columns(index_SxB[begin:end], mask_SxB[begin:end], process_count)
    columns = process_columns(index_SxB.shape[1], process_index, process_count)
    return index_SxB[:, columns], mask_SxB[:, columns]


def position(step: int, steps_in_epoch: int) -> tuple[int, int]:
    """`(epoch, step within it)` of global step `step`."""
    return divmod(step, steps_in_epoch)
