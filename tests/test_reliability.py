"""Issue 18: every failure reading user files is an fml error naming the file and
the field, checkpoint metadata is covered by its checksum, memory is bounded by
the input (headers are checked before arrays are read), a run directory has one
writer at a time, killed exports are repaired, a full disk is an fml error."""

import io
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest
import torch
from _faults import file_size_limit

import fml
from fml import checkpoint, experiment, rundir
from fml.errors import CheckpointError, ConfigError, ExportError, ShapeError
from fml.export import export, recover
from fml.export import torch as fml_torch
from fml.lock import LOCK_FILE, holder, run_lock
from fml.parallel import bounded_dispatch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(30, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 30).astype(np.int32)
MLP = fml.models.mlp([8, 3])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory of an MLP on `(X, Y)`: run files and checkpoints at steps 3 and 6
    (24 rows to train in batches of 8, 6 held out, early stopping on)."""
    path = tmp_path_factory.mktemp("reliability") / "run"
    state, history = fml.fit(
        MLP, (X, Y), epochs=2, batch_size=8, quiet=True, checkpoint_dir=path, patience=5,
        validation=0.2, checkpoint_every_epochs=1,
    )  # fmt: skip
    config = {"input_shape": [4], "task": "classification", "dataset": "iris"}
    rundir.save_run(path, model=MLP, params=state.params, config=config, history=history)
    return path


@pytest.fixture
def copy(run_dir, tmp_path):
    return pathlib.Path(shutil.copytree(run_dir, tmp_path / "run"))


# ------------------------------------------------------------------ run directory files


RUN_FILE_DAMAGE = {
    "family-is-a-list": ("spec.json", json.dumps({"family": ["mlp"], "widths": [8, 3]}).encode()),
    "invalid-utf8": ("spec.json", b'{"family": "\xff\xfe"}'),
    "deeply-nested": ("config.json", b"[" * 100_000 + b"]" * 100_000),
    "config-is-a-list": ("config.json", b'[{"input_shape": [4]}]'),
    "spec-is-a-number": ("spec.json", b"3"),
    "input-shape-strings": ("config.json", b'{"input_shape": ["4"]}'),
    "input-shape-negative": ("config.json", b'{"input_shape": [-4]}'),
    "input-shape-wrong-size": ("config.json", b'{"input_shape": [5]}'),
    "spec-bad-hyperparameter": ("spec.json", b'{"family": "cnn", "layer_specs": [{"type": "conv"}]}'),
}  # fmt: skip


@pytest.mark.parametrize("damage", RUN_FILE_DAMAGE)
def test_damaged_run_files_are_checkpoint_errors_naming_the_file(copy, damage):
    name, content = RUN_FILE_DAMAGE[damage]
    (copy / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=str(copy)) as raised:
        rundir.load_run(copy)
    assert name in str(raised.value) or "params" in str(raised.value)


def test_config_without_a_dataset_is_named_by_eval(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["dataset"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: expected a 'dataset' name, got None"):
        experiment.evaluate_run(copy)


def _npz(path, arrays: dict, *, compression=zipfile.ZIP_STORED):
    """Writes `arrays` ({name: array}) as an .npz with `compression`."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, a in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, a, allow_pickle=False)
            archive.writestr(f"{name}.npy", buffer.getvalue())


@pytest.mark.parametrize(
    "dtype, match",
    [("U3", "has dtype <U3; expected real numbers"), (np.complex64, "has dtype complex64")],
)
def test_npz_of_strings_or_complex_numbers_is_refused(copy, dtype, match):
    params = rundir.load_params(copy / "params.npz")
    flat = {k: v.astype(dtype) for k, v in rundir.flatten_params(params).items()}
    _npz(copy / "params.npz", flat)
    with pytest.raises(CheckpointError, match=match):
        rundir.load_run(copy)


def test_npz_member_shorter_than_its_header_is_refused(copy):
    flat = rundir.flatten_params(rundir.load_params(copy / "params.npz"))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, flat["dense_0/w"])
    with zipfile.ZipFile(copy / "params.npz", "w") as archive:
        archive.writestr("dense_0/w.npy", buffer.getvalue()[:-8])
    with pytest.raises(CheckpointError, match=r"declares shape \(4, 8\) of float32 \(256 bytes"):
        rundir.load_params(copy / "params.npz")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_npz_zip_bomb_is_refused_from_its_headers(copy):
    # 400 MB of zeros deflated to < 1 MB, where the spec expects 32 floats.
    flat = rundir.flatten_params(rundir.load_params(copy / "params.npz"))
    path = copy / "params.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, a in flat.items():
            if name != "dense_0/w":
                archive.writestr(f"{name}.npy", _npy_bytes(a))
        with archive.open("dense_0/w.npy", "w", force_zip64=True) as f:
            rows = 100_000
            f.write(_npy_header((rows, 1000), np.float32))
            zeros = bytes(4000 * 1000)
            for _ in range(rows // 1000):
                f.write(zeros)
    assert path.stat().st_size < 2_000_000
    before = _max_rss_mb()
    with pytest.raises(CheckpointError, match=r"dense_0/w: expected \(\(4, 8\), 'float32'\), got"):
        rundir.load_run(copy)
    assert _max_rss_mb() - before < 100  # the 400 MB array was never read


def _npy_bytes(a) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, a)
    return buffer.getvalue()


def _npy_header(shape, dtype) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": shape})
    return buffer.getvalue()


# ------------------------------------------------------------------ checkpoint metadata

META_DAMAGE = {
    "key_impl": lambda m: m.update(key_impl="rbg"),
    "history": lambda m: m.update(history={"train_loss": "low"}),
    "epoch_metrics": lambda m: m.update(epoch_metrics={"loss": [1.0], "accuracy": [1, 2]}),
    "best": lambda m: m.update(best={"loss": 0.1}),
    "step": lambda m: m.update(step="8"),
    "config": lambda m: m["config"].update(input_shape="4"),
}


def _meta_file(run, step=6) -> pathlib.Path:
    return run / "checkpoints" / str(step) / "meta" / "metadata"


@pytest.mark.parametrize("field", META_DAMAGE)
@pytest.mark.parametrize("resign", [False, True], ids=["tampered", "tampered-and-resigned"])
def test_tampered_checkpoint_metadata_is_refused(copy, field, resign):
    meta = json.loads(_meta_file(copy).read_text())
    assert meta["sha256"] == checkpoint.meta_sha256(meta)  # as saved: signed
    META_DAMAGE[field](meta)
    if resign:  # a consistent checksum over bad values: the types are checked too
        meta["sha256"] = checkpoint.meta_sha256(meta)
    _meta_file(copy).write_text(json.dumps(meta))
    match = f"metadata entry '{field}'" if resign else "metadata does not match its SHA-256"
    if resign and field == "key_impl":
        match = "key data does not fit key_impl 'rbg'"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.restore(copy)
    with pytest.raises(CheckpointError, match=match):  # and resuming it
        fml.fit(
            MLP, (X, Y), epochs=3, batch_size=8, quiet=True, checkpoint_dir=copy, resume=True,
            patience=5, validation=0.2, checkpoint_every_epochs=1,
        )  # fmt: skip
    _, state = checkpoint.restore(copy, step=3)  # the other checkpoint is untouched
    assert int(state.step) == 3


def test_checkpoint_metadata_round_trips_its_checksum(run_dir):
    restored = checkpoint.Checkpointer(run_dir, read_only=True).restore()
    meta = restored.meta
    assert meta["format"] == 2 and meta["sha256"] == checkpoint.meta_sha256(meta)
    assert meta["arrays_sha256"] == checkpoint.tree_sha256(
        jax.device_get(checkpoint._state_tree(restored.state, restored.best_params))
    )


# ------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
def test_float8_or_complex_state_dict_is_refused(dtype):
    params = MLP.init(jax.random.key(0), (4,))
    state = fml_torch.to_state_dict(MLP, params, (4,))
    state["dense_0.weight"] = state["dense_0.weight"].to(dtype)
    with pytest.raises(
        CheckpointError, match=f"'dense_0.weight': expected a float tensor, got dtype {dtype}"
    ):
        fml_torch.from_state_dict(MLP, state, (4,))
    with pytest.raises(CheckpointError, match="expected a state dict"):
        fml_torch.from_state_dict(MLP, [1, 2], (4,))


def test_safetensors_header_is_checked_before_tensors_are_read(tmp_path):
    params = MLP.init(jax.random.key(0), (4,))
    path = tmp_path / "model.safetensors"
    fml_torch.write_safetensors(MLP, params, (4,), path)
    header = fml_torch.safetensors_header(path)
    assert header["dense_0.weight"] == ((8, 4), "F32")
    expected = {k: shape for k, (shape, _) in header.items()}
    assert fml_torch.load_state_dict(path, expected=expected)["dense_0.weight"].shape == (8, 4)
    with pytest.raises(CheckpointError, match=r"'dense_0.weight': expected shape \(9, 4\)"):
        fml_torch.load_state_dict(path, expected={**expected, "dense_0.weight": (9, 4)})
    # A header that claims a tensor 1000x larger than the file holds.
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + length].decode().replace("[8,4]", "[8000,4]", 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(text).to_bytes(8, "little") + text.encode() + data[8 + length :])
    with pytest.raises(CheckpointError, match=r"tensor 'dense_0.weight' of shape \[8000, 4\]"):
        fml_torch.load_state_dict(bad)


# ------------------------------------------------------------------ empty batches


def test_cnn_on_an_empty_batch_gives_an_empty_output():
    model = fml.models.cnn([fml.models.conv(4, 3), fml.models.max_pool(2), fml.models.dense(3)])
    params = model.init(jax.random.key(0), (8, 1))
    y = model.apply(params, np.zeros((0, 8, 1), np.float32))
    assert y.shape == (0, 3) and y.dtype == np.float32
    with pytest.raises(ShapeError, match="dense layer expected 16 input features, got 8"):
        model.apply(params, np.zeros((0, 4, 1), np.float32))


# ------------------------------------------------------------------ a full disk


def test_full_disk_while_writing_a_run_directory_keeps_the_old_files(copy):
    before = (copy / "params.npz").read_bytes()
    big = fml.models.mlp([512, 3])
    params = big.init(jax.random.key(0), (4,))
    with (
        file_size_limit(4096),
        pytest.raises(CheckpointError, match="could not write .*params.npz"),
    ):
        rundir.save_run(copy, model=big, params=params, config={"input_shape": [4]})
    assert (copy / "params.npz").read_bytes() == before
    assert not [p for p in copy.iterdir() if p.name.startswith(".params.npz")]


@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_full_disk_while_exporting_is_an_export_error(tmp_path, to):
    big = fml.models.mlp([512, 3])
    params = big.init(jax.random.key(0), (4,))
    path = tmp_path / f"model.{to}"
    with (
        file_size_limit(4096),
        pytest.raises(ExportError, match=f"could not write the {to} export"),
    ):
        export(big, params, path, to=to, input_shape=(4,))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no staging, no lock


# ------------------------------------------------------------------ one writer at a time


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    code = f"from fml.lock import run_lock; import time\nwith run_lock({str(tmp_path)!r}):\n"
    code += "    print('locked', flush=True); time.sleep(60)\n"
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert other.stdout.readline() == "locked\n"
        match = f"another process \\(pid {other.pid} on host "
        with pytest.raises(CheckpointError, match=match), run_lock(tmp_path):
            pass
        assert holder(tmp_path)["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
    with run_lock(tmp_path), run_lock(tmp_path):  # its death freed it; re-entrant here
        assert holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "here"}))
    with run_lock(tmp_path):
        assert holder(tmp_path)["pid"] == os.getpid()


def test_two_fml_train_with_the_same_out_never_mix(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "fml",
        "train",
        "mlp",
        "--dataset",
        "digits",
        "--out",
        str(out),
    ]
    first = subprocess.Popen([*command, "--epochs", "40", "--seed", "1"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        second = subprocess.run([*command, "--epochs", "1", "--seed", "2"], env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert first.poll() is None, "the first run ended before the second tried"
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"being written by another process (pid {first.pid} on host" in second.stderr
        assert time.monotonic() - started < 90  # its start-up only: it trains nothing
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
        first.wait()
    model, params, config = rundir.load_run(out)
    assert config["seed"] == 1 and config["epochs"] == 40
    saved = checkpoint.Checkpointer(out, read_only=True)
    assert all(saved.read_meta(s)["config"]["seed"] == 1 for s in saved.steps())
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------ killed exports


KILL_AT_SECOND_RENAME = """
import os, pathlib, signal, sys
from fml import export
calls = []
real = os.replace
def replace(a, b):
    calls.append((a, b))
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
export.os.replace = replace
path = pathlib.Path(sys.argv[1])
with export._staged(path) as staged:
    staged.mkdir()
    (staged / "saved_model.pb").write_text("new")
"""


def test_export_killed_between_the_renames_is_finished_by_the_next(tmp_path):
    path = tmp_path / "export" / "saved_model"
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_RENAME, str(path)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert not path.exists()  # the window: the old copy is in the staging directory
    (stage,) = path.parent.glob(".saved_model.export-*")
    assert (stage / "previous" / "saved_model.pb").read_text() == "old"
    recover(path)  # what the next export to `path` does first
    assert (path / "saved_model.pb").read_text() == "new"  # verified: finished
    assert [p.name for p in path.parent.iterdir()] == ["saved_model"]


def test_unverified_killed_export_puts_the_old_copy_back(tmp_path):
    path = tmp_path / "saved_model"
    stage = tmp_path / ".saved_model.export-abc"
    (stage / "previous").mkdir(parents=True)
    (stage / "previous" / "saved_model.pb").write_text("old")
    (stage / "saved_model").mkdir()  # written but never verified
    leaked = tmp_path / ".saved_model.export-def"  # a kill before any rename
    leaked.mkdir()
    params = MLP.init(jax.random.key(0), (4,))
    export(MLP, params, tmp_path / "saved_model.safetensors", to="safetensors", input_shape=(4,))
    assert stage.exists() and leaked.exists()  # another target's staging: not touched
    recover(path)
    assert (path / "saved_model.pb").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model", "saved_model.safetensors"]


# ------------------------------------------------------------------ bounded in-flight pmap


def test_bounded_dispatch_waits_every_k_calls(monkeypatch):
    waited = []
    monkeypatch.setattr(fml.parallel.jax, "block_until_ready", lambda out: waited.append(out))
    step = bounded_dispatch(lambda state, batch: (state + batch, None), every=3)
    state = 0
    for batch in range(1, 8):
        state, _ = step(state, batch)
    assert state == 28 and [out[0] for out in waited] == [6, 21]  # after calls 3 and 6
    with pytest.raises(ConfigError, match="every to be a positive int, got 0"):
        bounded_dispatch(step, every=0)


def test_host_fed_pmap_epochs_of_63_steps_run_to_the_end():
    # mnist1d's MLP, batch 64: 63 steps an epoch; unbounded, XLA:CPU aborted the
    # process within the first 16 steps (an all-reduce short of one of 8 threads).
    data = fml.data.load("mnist1d")
    model = fml.models.mlp([512, 512, 10], dropout=0.5)
    state, history = fml.fit(model, data, batch_size=64, epochs=2, parallel="pmap", quiet=True)
    assert int(state.step) == 2 * 63
    assert history["train_loss"][1] < history["train_loss"][0] < np.log(10) + 0.5
