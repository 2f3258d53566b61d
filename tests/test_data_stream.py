"""The streaming input pipeline: batches equal to `epoch_indices`, determinism,
per-process shards, resume, padding masks, prefetching, global arrays."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fml
from fml.data import ArraySource, BatchStream, Position, epoch_key
from fml.errors import ConfigError
from fml.train import epoch_indices

N, FEATURES = 23, 3


def _arrays(n=N):
    """Inputs whose first column is the example's index, so batches reveal their rows."""
    x = np.stack([np.arange(n), np.arange(n) * 2.0, -np.arange(n)], axis=1).astype(np.float32)
    return x, np.arange(n, dtype=np.int32) % 4


def _indices(batch):
    return np.asarray(batch["x"])[:, 0].astype(int)


def _take(stream, count):
    return [jax.device_get(b) for b in itertools.islice(iter(stream), count)]


def _stream(seed=0, **kwargs):
    kwargs.setdefault("batch_size", 5)
    return BatchStream(ArraySource(*_arrays()), seed=seed, **kwargs)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_in_memory_batches_are_those_of_epoch_indices(drop_remainder):
    x, y = _arrays()
    stream = _stream(seed=7, drop_remainder=drop_remainder, epochs=3)
    got = [jax.device_get(b) for b in stream]
    expected = []
    for epoch in range(3):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 1), epoch)
        index_SxB, mask_SxB = jax.device_get(epoch_indices(key, N, 5, drop_remainder))
        expected += [{"x": x[i], "y": y[i], "mask": m} for i, m in zip(index_SxB, mask_SxB)]
    assert len(got) == len(expected) == 3 * stream.steps_per_epoch
    for g, e in zip(got, expected):
        for k in ("x", "y", "mask"):
            np.testing.assert_array_equal(g[k], e[k])
            assert g[k].dtype == e[k].dtype
    assert stream.position == Position(3, 0)


def test_same_seed_same_batches_other_seed_other_order():
    first, again, other = (_take(_stream(seed=s), 12) for s in (3, 3, 4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x"], b["x"])
    order = np.concatenate([_indices(b) for b in first[:5]])
    other_order = np.concatenate([_indices(b) for b in other[:5]])
    assert not np.array_equal(order, other_order)
    # both are permutations of the same examples (plus padding of index 0)
    real = np.concatenate([b["mask"] for b in first[:5]]) > 0
    other_real = np.concatenate([b["mask"] for b in other[:5]]) > 0
    np.testing.assert_array_equal(np.sort(order[real]), np.arange(N))
    np.testing.assert_array_equal(np.sort(other_order[other_real]), np.arange(N))


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_each_example_once(processes):
    batch_size, epochs = 8, 2
    single = [jax.device_get(b) for b in _stream(batch_size=batch_size, epochs=epochs)]
    shards = [
        [
            jax.device_get(b)
            for b in _stream(
                batch_size=batch_size, epochs=epochs, process_index=p, process_count=processes
            )
        ]
        for p in range(processes)
    ]
    steps = len(single) // epochs
    for epoch in range(epochs):
        seen = []
        for p in range(processes):
            for batch in shards[p][epoch * steps : (epoch + 1) * steps]:
                assert batch["x"].shape == (batch_size // processes, FEATURES)
                seen.append(_indices(batch)[batch["mask"] > 0])
        seen = np.concatenate(seen)
        assert len(seen) == N and len(np.unique(seen)) == N  # disjoint, each exactly once
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))
    # the processes' local batches, side by side, are the single-process global batch
    for s, global_batch in enumerate(single):
        for k in ("x", "y", "mask"):
            joined = np.concatenate([shards[p][s][k] for p in range(processes)])
            np.testing.assert_array_equal(joined, global_batch[k])


@pytest.mark.parametrize("stop_after", [2, 5, 9])
def test_resume_from_a_saved_position_gives_the_remaining_batches(stop_after):
    uninterrupted = _take(_stream(seed=11), 14)
    stream = _stream(seed=11)
    for _ in zip(range(stop_after), stream):
        pass
    saved = stream.position._asdict()  # what a checkpoint would store
    assert saved == {"epoch": stop_after // 5, "step": stop_after % 5}
    resumed = _take(_stream(seed=11, position=(saved["epoch"], saved["step"])), 14 - stop_after)
    for a, b in zip(uninterrupted[stop_after:], resumed, strict=True):
        for k in ("x", "y", "mask"):
            np.testing.assert_array_equal(a[k], b[k])


def test_position_counts_consumed_batches_not_prefetched_ones():
    stream = _stream(prefetch=4)
    it = iter(stream)
    next(it)
    next(it)
    assert stream.position == Position(0, 2)


def test_padded_last_batch_loss_is_the_loss_of_its_real_examples():
    x, y = _arrays()
    model = fml.models.logistic_regression(4)
    tx = fml.train.make_optimizer("sgd", 0.1)
    objective = fml.train.make_objective(model)
    step = jax.jit(fml.train.make_train_step(model, objective, tx))
    state = fml.train.init_state(model, tx, (FEATURES,), seed=1)
    last = list(_stream(batch_size=5, epochs=1))[-1]  # 23 = 4 * 5 + 3: 2 rows of padding
    mask = np.asarray(last["mask"])
    assert mask.tolist() == [1, 1, 1, 0, 0]
    _, metrics = step(state, last)
    real = _indices(last)[mask > 0]
    logits = x[real] @ np.asarray(state.params["dense"]["w"]) + np.asarray(
        state.params["dense"]["b"]
    )
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    reference = np.mean(log_z - logits[np.arange(len(real)), y[real]])
    np.testing.assert_allclose(float(metrics["loss"]), reference, rtol=1e-5)
    assert float(metrics["count"]) == 3.0


@pytest.mark.parametrize("workers", [1, 3])
def test_prefetch_keeps_order_and_raises_producer_errors(workers):
    items = list(fml.data.prefetch(iter(range(20)), lambda v: v * 2, size=3, workers=workers))
    assert items == [2 * v for v in range(20)]

    def failing():
        yield 1
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        list(fml.data.prefetch(failing(), lambda v: v, workers=workers))


def test_batches_are_device_arrays_and_global_arrays_over_a_mesh():
    batch = next(iter(_stream(batch_size=8)))
    assert isinstance(batch["x"], jax.Array)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    host = next(iter(_stream(batch_size=8, put=lambda b: b)))
    placed = next(iter(_stream(batch_size=8, sharding=sharding)))
    for k in ("x", "y", "mask"):
        assert placed[k].sharding == sharding and placed[k].shape[0] == 8
        np.testing.assert_array_equal(jax.device_get(placed[k]), host[k])
    assert len(placed["x"].addressable_shards) == len(jax.devices())


def test_uneven_global_batch_pads_columns_for_processes():
    """A global batch of 6 over 4 processes: each reads 2 columns of the batch padded
    to 8 with mask 0, and together they read every example once per epoch."""
    shards = [
        [
            jax.device_get(b)
            for b in _stream(batch_size=6, epochs=1, process_index=p, process_count=4)
        ]
        for p in range(4)
    ]
    seen = np.concatenate([_indices(b)[b["mask"] > 0] for shard in shards for b in shard])
    assert all(b["x"].shape == (2, FEATURES) for shard in shards for b in shard)
    np.testing.assert_array_equal(np.sort(seen), np.arange(N))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "positive int"),
        ({"batch_size": 4, "process_count": 2, "process_index": 2}, r"process_index in \[0, 2\)"),
        ({"batch_size": 30, "drop_remainder": True}, "batch_size 30 > 23"),
        ({"batch_size": 5, "position": (0, 5)}, r"step in \[0, 5\)"),
    ],
)
def test_bad_stream_options_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _stream(**kwargs)


def test_epoch_key_is_fits_shuffle_key():
    expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 1), 2)
    np.testing.assert_array_equal(
        jax.random.key_data(epoch_key(5, 2)), jax.random.key_data(expected)
    )


def test_fit_reads_the_pipeline_bit_identically_from_arrays_and_from_a_stream():
    """`fit`'s per-step path reads the pipeline: from arrays and from a `BatchStream`
    its result is bit-identical to jitted steps over `epoch_indices` batches by hand."""
    x, y = _arrays()
    model = fml.models.logistic_regression(4)
    from_arrays, h1 = fml.fit(model, (x, y), epochs=2, batch_size=5, seed=3, quiet=True)
    stream = BatchStream(ArraySource(x, y), batch_size=5, seed=3)
    from_stream, h2 = fml.fit(model, stream, epochs=2, seed=3, quiet=True)

    tx = fml.train.make_optimizer("adam", 1e-3)
    objective = fml.train.make_objective(model)
    # penalize=False: fit leaves the L2 term out of the program when l2 is 0
    step = jax.jit(fml.train.make_train_step(model, objective, tx, penalize=False))
    by_hand = fml.train.init_state(model, tx, (FEATURES,), seed=3)
    for epoch in range(2):
        index_SxB, mask_SxB = jax.device_get(epoch_indices(epoch_key(3, epoch), N, 5))
        for i, m in zip(index_SxB, mask_SxB):
            by_hand, _ = step(by_hand, {"x": x[i], "y": y[i], "mask": m})
    for fitted in (from_arrays, from_stream):
        for a, b in zip(jax.tree.leaves(fitted.params), jax.tree.leaves(by_hand.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h1["train_loss"] == h2["train_loss"]
    with pytest.raises(ConfigError, match="not fused"):
        fml.fit(model, stream, fused=True, quiet=True)
