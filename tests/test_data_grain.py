"""Streams on Grain and the sources on disk: batches equal to fml's batch plan with
and without worker processes, Parquet part-files as Spark writes them, memory-mapped
`.npy`, training equal to training on the arrays, bad files, failing sources and
killed workers."""

import doctest
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fml
from fml.data import ArraySource, BatchStream, Position, _grain
from fml.errors import DataError

N, FEATURES = 23, 3


def _arrays(n=N):
    """Inputs whose first column is the example's index, so batches reveal their rows."""
    x = np.stack([np.arange(n), np.arange(n) * 2.0, -np.arange(n)], axis=1).astype(np.float32)
    return x, np.arange(n, dtype=np.int32) % 4


def _host(batches):
    return [jax.device_get(b) for b in batches]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for k in ("x", "y", "mask"):
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype


def _spark_output(root, x, y, parts=3, row_group_size=4):
    """`x, y` written as a Spark job writes a table: part-files of a few row groups
    (the first under a `key=value/` partition directory, which sorts first), `_SUCCESS` and `.crc` files."""
    os.makedirs(root / "day=2026-12-01")
    (root / "_SUCCESS").write_bytes(b"")
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table(
            {
                **{f"f{j}": x[lo:hi, j] for j in range(x.shape[1])},
                "vec": pa.array(list(x[lo:hi]), pa.list_(pa.float32())),
                "label": y[lo:hi],
                "name": [f"row{i}" for i in range(lo, hi)],
            }
        )
        folder = root / "day=2026-12-01" if p == 0 else root  # sorts first
        name = f"part-{p:05d}-5f3c2d1e-0000-c000.snappy.parquet"
        pq.write_table(table, folder / name, row_group_size=row_group_size)
        (folder / f".{name}.crc").write_bytes(b"not parquet")
    return root


@pytest.fixture
def spark_dir(tmp_path):
    return _spark_output(tmp_path / "out", *_arrays())


# ------------------------------------------------------------------ batch order


@pytest.mark.parametrize(
    "workers, drop_remainder, process", [(0, False, (0, 1)), (0, True, (1, 2)), (2, True, (1, 2))]
)
def test_grain_batches_are_the_batch_streams_on_every_shard(workers, drop_remainder, process):
    x, y = _arrays()
    options = dict(batch_size=6, seed=7, drop_remainder=drop_remainder, epochs=3)
    shard = dict(process_index=process[0], process_count=process[1])
    expected = _host(BatchStream(ArraySource(x, y), **options, **shard))
    grained = fml.data.stream(ArraySource(x, y), workers=workers, **options, **shard)
    _assert_same_batches(_host(grained), expected)
    assert grained.position == Position(3, 0)


def test_a_resumed_stream_reads_the_remaining_batches_and_any_steps_of_an_epoch():
    x, y = _arrays()
    resumed = fml.data.stream(ArraySource(x, y), batch_size=6, seed=7, epochs=3, position=(1, 2))
    expected = _host(BatchStream(ArraySource(x, y), batch_size=6, seed=7, epochs=3))
    _assert_same_batches(_host(resumed), expected[4 + 2 :])
    # steps begin..end-1 of an epoch, placed by the caller's put
    got = list(resumed.batches(2, 1, 3, put=lambda b: b))
    _assert_same_batches(got, expected[2 * 4 + 1 : 2 * 4 + 3])


def test_unshuffled_stream_reads_in_order():
    x, y = _arrays()
    batches = _host(fml.data.stream(ArraySource(x, y), batch_size=5, shuffle=False, epochs=1))
    order = np.concatenate([b["x"][:, 0] for b in batches]).astype(int)
    np.testing.assert_array_equal(order, [*range(N), 0, 0])
    assert batches[-1]["mask"].tolist() == [1, 1, 1, 0, 0]


# ------------------------------------------------------------------ sources


def test_parquet_part_files_read_like_the_arrays(spark_dir):
    x, y = _arrays()
    columns = fml.data.parquet_source(spark_dir, features=["f0", "f1", "f2"], label="label")
    vector = fml.data.parquet_source(
        str(spark_dir / "**" / "part-*.parquet"), features="vec", label="label", cache_bytes=0
    )
    files = fml.data.parquet_files(spark_dir)
    assert len(files) == 3 and all(f.endswith(".snappy.parquet") for f in files)
    assert len(columns) == len(vector) == N and columns.input_shape == (FEATURES,)
    index = np.random.default_rng(0).permutation(N)[:11]
    for source in (columns, vector, pickle.loads(pickle.dumps(columns))):
        got = source.read(index)
        np.testing.assert_array_equal(got["x"], x[index])
        np.testing.assert_array_equal(got["y"], y[index])
        assert got["x"].dtype == np.float32 and got["y"].dtype == np.int32
    assert columns[5]["x"].tolist() == x[5].tolist()
    shaped = fml.data.parquet_source(spark_dir, features="vec", label="label", shape=(3, 1))
    np.testing.assert_array_equal(shaped.read(index)["x"], x[index][:, :, None])


def test_npy_files_are_memory_mapped_and_read_like_the_arrays(tmp_path):
    x, y = _arrays()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    source = fml.data.npy_source(tmp_path / "x.npy", tmp_path / "y.npy")
    assert isinstance(source._open()[0], np.memmap) and len(source) == N
    index = np.array([4, 0, 22, 4])
    for s in (source, pickle.loads(pickle.dumps(source))):
        np.testing.assert_array_equal(s.read(index)["x"], x[index])
        np.testing.assert_array_equal(s.read(index)["y"], y[index])


def test_training_from_parquet_part_files_equals_training_on_the_arrays(spark_dir):
    x, y = _arrays()
    model = fml.models.mlp([8, 4])
    options = dict(epochs=2, seed=3, optimizer="sgd", learning_rate=0.1, quiet=True)
    in_memory, h1 = fml.fit(model, (x, y), batch_size=5, **options)
    source = fml.data.parquet_source(spark_dir, features=["f0", "f1", "f2"], label="label")
    for workers in (0, 2):
        stream = fml.data.stream(source, batch_size=5, seed=3, workers=workers)
        streamed, h2 = fml.fit(model, stream, **options)
        stream.close()
        for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(in_memory.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=1e-6)
    assert h1["train_loss"][-1] < h1["train_loss"][0]


# ------------------------------------------------------------------ bad input


def test_a_file_that_is_not_parquet_is_named(spark_dir):
    bad = spark_dir / "part-00009-5f3c2d1e-0000-c000.snappy.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=r"part-00009.*not a readable Parquet file"):
        fml.data.parquet_source(spark_dir, features=["f0"], label="label")


def test_a_corrupt_row_group_is_named_with_its_file(spark_dir):
    path = fml.data.parquet_files(spark_dir)[0]
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(pathlib.Path(path).read_bytes())
    start = column.data_page_offset
    data[start : start + 16] = b"\xff" * 16  # the page header of row group 1, column f0
    pathlib.Path(path).write_bytes(bytes(data))
    source = fml.data.parquet_source(spark_dir, features=["f0", "f1"], label="label")
    np.testing.assert_array_equal(source.read(np.arange(4))["y"], _arrays()[1][:4])  # group 0
    with pytest.raises(DataError, match=rf"{path} row group 1: corrupt Parquet data"):
        source.read(np.array([5]))
    stream = fml.data.stream(source, batch_size=N, shuffle=False, epochs=1)
    with pytest.raises(DataError, match="row group 1"):
        list(stream)


@pytest.mark.parametrize(
    "features, label, match",
    [
        (["f0", "nope"], "label", r"no column 'nope'; expected it among .*'f0', 'f1'"),
        (["f0"], "missing", r"no column 'missing'"),
        (["f0", "name"], "label", r"feature column 'name' has type string; expected a number"),
        ("name", "label", r"feature column 'name' has type string; expected a number or a list"),
        (["f0"], "name", r"label column 'name' has type string; expected an int .* or a float"),
        (["f0"], "vec", r"label column 'vec' has type list<element: float>; expected an int"),
    ],
)
def test_a_missing_or_wrongly_typed_column_is_named_with_both_types(
    spark_dir, features, label, match
):
    with pytest.raises(DataError, match=match):
        fml.data.parquet_source(spark_dir, features=features, label=label)


def test_no_parquet_files_and_a_bad_npy_file_are_data_errors(tmp_path):
    (tmp_path / "_SUCCESS").write_bytes(b"")
    with pytest.raises(DataError, match=r"no Parquet files \(\*\.parquet\) found"):
        fml.data.parquet_source(tmp_path, features=["a"], label="b")
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.npy: not a readable \.npy file"):
        fml.data.npy_source(tmp_path / "x.npy", tmp_path / "x.npy")


_FAILING_RUN = """
import sys, time
import numpy as np
import fml

class Failing:
    def __len__(self):
        return 40

    def read(self, index_B):
        if index_B.min() < 0 or 7 in index_B:
            raise ValueError("record 7 is bad")
        if 8 in index_B or 16 in index_B:
            time.sleep(3600)  # reads that never return (steps 2 and 4: the other worker)
        return {"x": np.zeros((len(index_B), 2), np.float32), "y": np.zeros(len(index_B), np.int32)}

if __name__ == "__main__":
    stream = fml.data.stream(Failing(), batch_size=4, shuffle=False, workers=int(sys.argv[1]))
    try:
        for batch in stream:
            pass
    except ValueError as e:
        print("caught:", e, flush=True)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_raising_mid_epoch_reaches_the_caller_and_the_process_exits(tmp_path, workers):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_FAILING_RUN))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), str(workers)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "caught: record 7 is bad" in done.stdout
    assert time.monotonic() - start < 60


class _Suicidal:
    """Kills the worker process reading row 9."""

    def __len__(self):
        return 40

    def read(self, index_B):
        if 9 in index_B:
            os.kill(os.getpid(), 9)
        return {"x": np.zeros((len(index_B), 2), np.float32), "y": np.zeros(len(index_B), np.int32)}


def test_a_killed_worker_is_a_data_error_not_a_hang():
    stream = fml.data.stream(_Suicidal(), batch_size=4, shuffle=False, epochs=1, workers=2)
    start = time.monotonic()
    with pytest.raises(
        DataError, match=r"input worker process died before global step \d+ was read .*exit code -9"
    ):
        list(stream)
    assert time.monotonic() - start < 60


def test_docstring_examples():
    result = doctest.testmod(_grain, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_a_parquet_stream_trains_under_shard_map_and_resumes_exactly(spark_dir, tmp_path):
    x, y = _arrays()
    model = fml.models.mlp([8, 4])
    source = fml.data.parquet_source(spark_dir, features=["f0", "f1", "f2"], label="label")
    options = dict(seed=3, optimizer="sgd", learning_rate=0.1, quiet=True)

    def fresh():
        return fml.data.stream(source, batch_size=8, seed=3)

    in_memory, h1 = fml.fit(model, (x, y), batch_size=8, epochs=2, **options)
    sharded, h2 = fml.fit(model, fresh(), epochs=2, parallel="shard_map", **options)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(in_memory.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    run = tmp_path / "run"
    fml.fit(model, fresh(), epochs=1, checkpoint_dir=run, **options)
    resumed, h3 = fml.fit(model, fresh(), epochs=2, checkpoint_dir=run, resume=True, **options)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(in_memory.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
