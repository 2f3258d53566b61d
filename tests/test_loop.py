"""The training loop's parts compose: every data source x every launcher x per-step
or fused x uninterrupted or SIGKILLed and resumed; callbacks stop training and log
to TensorBoard and CSV.

The matrix: {in-memory arrays, a stream over memory-mapped .npy files, a stream over
a TFDS ArrayRecord set prepared here} x {one device, shard_map on 8 CPU devices,
pmap} x {per step, fused (arrays only: a stream is refused with ConfigError)}. Each
configuration equals the one-device in-memory run within 1e-5, and its run killed
at a random step (in a child process) and resumed is bit-identical to the same
configuration run without interruption.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import _loop_job as job
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fml
from fml.errors import ConfigError
from fml.rundir import flatten_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def leaves(tree):
    """The tree's arrays on the host (PRNG keys as their key data)."""

    def host(v):
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            v = jax.random.key_data(v)
        return np.asarray(jax.device_get(v))

    return [host(v) for v in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The matrix's data on disk: .npy files and a TFDS ArrayRecord 'mnist'."""
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("loop_data")
    x, y = job.arrays()
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    images, labels = job.images()
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=job.CLASSES),
        }
    )
    examples = [
        (i, {"image": im, "label": int(lab)}) for i, (im, lab) in enumerate(zip(images, labels))
    ]
    tfds.dataset_builders.store_as_tfds_dataset(
        "mnist",
        "3.0.1",
        features,
        {"train": examples},
        data_dir=root / "tfds",
        file_format="array_record",
    )
    parquet = root / "parquet"
    parquet.mkdir()
    for part, rows in enumerate(np.array_split(np.arange(job.N), 2)):
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1)), job.FEATURES)
        table = pa.table({"pixels": pixels, "label": y[rows]})
        pq.write_table(table, parquet / f"part-{part:05d}-0-c000.snappy.parquet", row_group_size=8)
    paths = {"x": str(root / "x.npy"), "y": str(root / "y.npy"), "tfds": str(root / "tfds")}
    return {**paths, "parquet": str(parquet)}


@pytest.fixture(scope="module")
def reference(paths):
    """The one-device in-memory run, per step, of each source's examples in its own
    order (TFDS stores a set's records shuffled by their keys)."""
    stream = job.data_for({"source": "array_record", "paths": paths})
    tfds_rows = stream.source.read(np.arange(job.N))
    runs = {"arrays": job.arrays(), "array_record": (tfds_rows["x"], tfds_rows["y"])}
    assert sorted(map(bytes, runs["array_record"][0])) == sorted(map(bytes, runs["arrays"][0]))
    return {
        name: fml.fit(fml.models.mlp([16, job.CLASSES]), data, **job.SETTINGS)
        for name, data in runs.items()
    }


def kill_step(config: dict) -> int:
    """A random step (seeded by the configuration) in the run's 8 steps, past the first."""
    name = f"{config['source']}-{config['parallel']}-{config['fused']}"
    return int(np.random.default_rng(sum(map(ord, name))).integers(2, 8))


CONFIGS = [
    (source, parallel, fused)
    for source in ("arrays", "memmap", "array_record", "parquet")
    for parallel in (None, "shard_map", "pmap")
    for fused in (False, True)
    if not (fused and source != "arrays")
]


@pytest.mark.parametrize("source, parallel, fused", CONFIGS)
def test_composition_matrix(paths, reference, tmp_path, source, parallel, fused):
    config = {"source": source, "parallel": parallel, "fused": fused, "paths": paths}
    full, full_history = job.fit(config, checkpoint_dir=tmp_path / "full", checkpoint_every=1)
    one_device, one_device_history = reference[
        "array_record" if source == "array_record" else "arrays"
    ]
    for got, want in zip(leaves(full.params), leaves(one_device.params), strict=True):
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        full_history["train_loss"], one_device_history["train_loss"], atol=TOLERANCE, rtol=0
    )

    run = tmp_path / "killed"
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps({**config, "run_dir": str(run), "kill_at": kill_step(config)})
    )
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_loop_job.py"), str(config_file)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert fml.checkpoint.latest_step(run) == kill_step(config) - 1

    resumed, resumed_history = job.fit(config, checkpoint_dir=run, checkpoint_every=1, resume=True)
    assert int(resumed.step) == int(full.step) == 8
    for got, want in zip(leaves(resumed), leaves(full), strict=True):
        np.testing.assert_array_equal(got, want)
    assert resumed_history["train_loss"] == full_history["train_loss"]


def test_a_fused_epoch_over_a_stream_is_refused(paths):
    with pytest.raises(ConfigError, match="stream .* not fused=True"):
        job.fit({"source": "memmap", "parallel": None, "fused": True, "paths": paths})


# ------------------------------------------------------------------ callbacks


class StopAtStep(fml.callbacks.Callback):
    """A user callback that ends training once the run reaches `step`."""

    def __init__(self, step):
        self.step, self.seen = step, []

    def next_stop(self, loop, step):
        return self.step

    def on_steps(self, loop, first_step, metrics):
        self.seen.append((first_step, len(metrics["loss"])))
        loop.stop = loop.step >= self.step


def test_user_callback_stops_training_at_a_chosen_step():
    x, y = job.arrays()
    stop = StopAtStep(5)
    state, history = fml.fit(
        fml.models.mlp([8, job.CLASSES]),
        (x, y),
        epochs=3,
        batch_size=16,
        quiet=True,
        callbacks=[stop],
    )
    assert int(state.step) == 5  # 4 steps an epoch: epoch 1 stopped after its first step
    assert history["epoch"] == [0]  # only the completed epoch is logged
    assert sum(n for _, n in stop.seen) == 5


def test_tensorboard_and_csv_hold_the_logged_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = job.arrays()
    logs = tmp_path / "tb"
    state, history = fml.fit(
        fml.models.mlp([8, job.CLASSES]),
        (x, y),
        epochs=3,
        batch_size=16,
        quiet=True,
        validation=0.2,
        callbacks=[fml.callbacks.TensorBoard(logs), fml.callbacks.CSVLogger(tmp_path / "h.csv")],
    )
    events = EventAccumulator(str(logs))
    events.Reload()
    steps = events.Scalars("train/loss")
    assert [e.step for e in steps] == list(range(1, int(state.step) + 1))
    epoch_loss = [e.value for e in events.Scalars("epoch/train_loss")]
    np.testing.assert_allclose(epoch_loss, history["train_loss"], rtol=1e-6)
    val = [e.value for e in events.Scalars("epoch/val_loss")]
    np.testing.assert_allclose(val, history["val_loss"], rtol=1e-6)
    # the epoch's train loss is the example-weighted mean of its steps' losses
    per_step = np.array([e.value for e in steps]).reshape(3, -1)
    counts = np.array([16, 16, 16])  # 48 training rows: 3 full batches an epoch
    np.testing.assert_allclose(per_step @ counts / counts.sum(), history["train_loss"], rtol=1e-5)
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(history["val_loss"], rel=1e-9)


def test_patience_without_validation_is_refused():
    x, y = job.arrays()
    with pytest.raises(ConfigError, match="no validation data"):
        fml.fit(fml.models.mlp([8, job.CLASSES]), (x, y), epochs=2, patience=1, quiet=True)


def test_progress_prints_a_line_per_epoch_when_not_a_terminal(capsys):
    x, y = job.arrays()
    fml.fit(fml.models.mlp([8, job.CLASSES]), (x, y), epochs=2, batch_size=16)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"]
    assert all("train_loss" in ln for ln in lines)


def test_a_callable_loss_on_float_targets_is_regression():
    """A Huber loss with float targets trains as regression (it used to be taken for
    classification because its name is not "mse")."""
    import optax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3)[:, None]

    def huber(outputs, targets):
        return optax.huber_loss(outputs, targets.reshape(outputs.shape)).mean(-1)

    state, history = fml.fit(
        fml.models.linear_regression(),
        (x, y),
        loss=huber,
        optimizer="lbfgs",
        epochs=50,
        quiet=True,
    )
    np.testing.assert_allclose(
        np.asarray(state.params["dense"]["w"])[:, 0], [1.0, -2.0, 0.5], atol=1e-3
    )
    assert "train_accuracy" not in history


def _launch_two(config: dict, tmp_path, name: str) -> list:
    """Runs the job in two processes x 4 CPU devices joined on 127.0.0.1."""
    from test_multihost import free_port

    port, procs = free_port(), []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    for pid in range(2):
        path = tmp_path / f"{name}{pid}.json"
        path.write_text(json.dumps({**config, "processes": 2, "process_id": pid, "port": port}))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_loop_job.py"), str(path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    try:
        return [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()


def test_two_processes_streaming_their_shards_killed_and_resumed(paths, tmp_path):
    """Two processes x 4 devices, each reading its columns of every global batch from
    the memory-mapped files, checkpointing one run directory: killed at a step (both),
    resumed, they end where one process with 8 devices does."""
    config = {"source": "memmap", "parallel": "shard_map", "fused": False, "paths": paths}
    run = {"run_dir": str(tmp_path / "run"), "out": str(tmp_path / "params.npz")}
    killed = _launch_two({**config, **run, "kill_at": 5}, tmp_path, "killed")
    assert [code for code, _ in killed] == [-9, -9], [err[-2000:] for _, err in killed]
    assert fml.checkpoint.latest_step(run["run_dir"]) == 4
    resumed = _launch_two({**config, **run}, tmp_path, "resumed")
    assert [code for code, _ in resumed] == [0, 0], [err[-2000:] for _, err in resumed]
    one_process, _ = job.fit(config)
    got = dict(np.load(run["out"]))
    want = flatten_params(jax.device_get(one_process.params))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=TOLERANCE, rtol=0)


def test_callbacks_that_are_not_callbacks_are_refused():
    x, y = job.arrays()
    model = fml.models.mlp([8, job.CLASSES])
    with pytest.raises(ConfigError, match="got int without on_train_begin, restore"):
        fml.fit(model, (x, y), epochs=1, quiet=True, callbacks=[3])
    with pytest.raises(ConfigError, match="list of fml.callbacks.Callback, got StopAtStep"):
        fml.fit(model, (x, y), epochs=1, quiet=True, callbacks=StopAtStep(2))
