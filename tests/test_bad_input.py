"""The bad-input table of docs/bad-input.md ("## Bad input and what it gets"), one test per
row: each bad input gets a typed fml error with a clear message, and nothing
already saved is lost."""

import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile
from typing import NamedTuple

import jax
import numpy as np
import optax
import pytest
from _faults import file_size_limit

import fml
import fml.cli
from fml import checkpoint, experiment, rundir
from fml.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DTypeError,
    ExportError,
    ShapeError,
    UnknownNameError,
)
from fml.models import cnn, conv, dense

README = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
RNG = np.random.default_rng(0)
X = RNG.normal(size=(20, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 20).astype(np.int32)
MLP = fml.models.mlp([8, 3])


class Row(NamedTuple):
    error: type | None  # None: the input is accepted, and `run` checks what it does
    match: str
    run: object  # run(ctx) makes the bad call (or calls, all must raise)


ROWS: dict[str, Row] = {}


def row(name: str, error, match: str = ""):
    def register(run):
        ROWS[name] = Row(error, match, run)
        return run

    return register


def fit(data, model=MLP, **kwargs):
    return fml.fit(model, data, epochs=1, batch_size=8, quiet=True, **kwargs)


# ------------------------------------------------------------------ data given to fit


@row("x-y-lengths", ShapeError, r"expected y with 20 rows like x, got y of shape \(5,\)")
def _(ctx):
    fit((X, Y[:5]))


@row("x-without-feature-axis", ShapeError, r"expected x of shape \(N, features...\), got \(20,\)")
def _(ctx):
    fit((X[:, 0], Y))


@row("labels-wrong-rank", ShapeError, r"expected labels of shape \(N,\) .*got \(20, 1, 1\)")
def _(ctx):
    fit((X, Y.reshape(20, 1, 1)))


@row("ragged-x", ShapeError, "x is not a rectangular array")
def _(ctx):
    fit(([[0.0, 1.0], [2.0]], [0, 1]))


@row("non-float-x", DTypeError, "expected floating-point x, got dtype")
def _(ctx):
    for bad in (X.astype(np.int32), X.astype(str), X.astype(np.complex64), X > 0):
        with pytest.raises(DTypeError, match="expected floating-point x"):
            fit((bad, Y))
    fit((np.array([None] * 20)[:, None], Y))


@row("float-targets-for-classifier", ShapeError, "float targets mean regression.*integer labels")
def _(ctx):
    fit((X, Y.astype(np.float32)))


@row("string-labels", DTypeError, "expected floating-point regression targets, got dtype <U")
def _(ctx):
    fit((X, Y.astype(str)))


@row("labels-out-of-range", DataError, r"expected labels in \[0, 2\], got range \[-1, 1\]")
def _(ctx):
    with pytest.raises(DataError, match=r"expected labels in \[0, 2\], got range \[3, 5\]"):
        fit((X, Y + 3))
    fit((X, Y - 1))


@row("nan-or-inf-in-data", DataError, "regression targets must be finite")
def _(ctx):
    with pytest.raises(DataError, match="x must be finite, found 1 NaN/inf values"):
        fit((np.where(np.arange(80).reshape(20, 4) == 7, np.nan, X), Y))
    fit((X, np.where(Y == 0, np.inf, 1.0).astype(np.float32)), fml.models.linear_regression())


@row("empty-data", DataError, r"expected at least one example, got x of shape \(0, 4\)")
def _(ctx):
    fit((X[:0], Y[:0]))


@row("batch-larger-than-data", ConfigError, "batch_size 50 > 20 examples with drop_remainder")
def _(ctx):
    state, _ = fml.fit(MLP, (X, Y), epochs=2, batch_size=50, quiet=True)
    assert int(state.step) == 2  # without drop_remainder: one padded, masked batch per epoch
    fml.fit(MLP, (X, Y), epochs=2, batch_size=50, drop_remainder=True, quiet=True)


@row("split-with-other-feature-shape", ShapeError, r"test data: expected x of shape")
def _(ctx):
    data = fml.data.Dataset("toy", "classification", X, Y, X[:, :3], Y, num_classes=3)
    fit(data)


@row("bad-hyperparameter-values", ConfigError, "expected learning_rate in")
def _(ctx):
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size to be a positive int"),
        ({"epochs": -1}, "epochs to be an int >= 0"),
        ({"learning_rate": 0.0}, r"learning_rate in \(0.0, inf\)"),
        ({"learning_rate": float("nan")}, "learning_rate in"),
        ({"clip_norm": -1.0}, "clip_norm in"),
        ({"l2": float("nan")}, "l2 in"),
        ({"validation": 1.5}, "validation fraction in"),
        ({"seed": "a"}, "seed to be an int"),
        ({"patience": -1}, "patience to be an int >= 0"),
        ({"checkpoint_every": 0}, "checkpoint_every to be a positive int"),
        ({"optimizer_kwargs": {"momentum": 0.9, "nonsense": 1}}, "does not take"),
    ]:
        with pytest.raises(ConfigError, match=match):
            fml.fit(MLP, (X, Y), quiet=True, **{"epochs": 1, "batch_size": 8, **kwargs})
    fit((X, Y), learning_rate="fast")


@row(
    "data-not-an-x-y-pair",
    ConfigError,
    r"expected data as an fml.data.Dataset, an \(x, y\) tuple or an fml.data.BatchStream",
)
def _(ctx):
    fit((X, Y, Y))


@row("not-a-model", ConfigError, "expected an fml Model, got dict")
def _(ctx):
    fit((X, Y), model={"family": "mlp"})


# ------------------------------------------------------------------ Model.apply


@row("apply-wrong-features", ShapeError, r"mlp: expected x of shape \(B, 4\).*got \(2, 5\)")
def _(ctx):
    params = MLP.init(jax.random.key(0), (4,))
    MLP.apply(params, np.ones((2, 5), np.float32))


@row("apply-wrong-rank", ShapeError, r"rnn: expected x of shape \(B, T, 2\), got \(2, 5\)")
def _(ctx):
    model = cnn([conv(4, 3), dense(3)])
    params = model.init(jax.random.key(0), (8, 1))
    with pytest.raises(ShapeError, match=r"cnn: expected x of shape \(B, W, C\) with C=1"):
        model.apply(params, np.ones((2, 8), np.float32))
    gru = fml.models.rnn("gru", 4, num_classes=3)
    gru.apply(gru.init(jax.random.key(0), (5, 2)), np.ones((2, 5), np.float32))


@row("apply-non-float-x", DTypeError, "expected a floating-point array x")
def _(ctx):
    params = MLP.init(jax.random.key(0), (4,))
    for bad in (np.ones((2, 4), np.int32), np.ones((2, 4)).astype(str)):
        with pytest.raises(DTypeError, match="mlp: expected floating-point inputs"):
            MLP.apply(params, bad)
    MLP.apply(params, [[0.0, 1.0], [2.0]])


@row("input-too-small-for-cnn", ShapeError, r"input_shape \(2, 1\) is too small")
def _(ctx):
    model = cnn([conv(4, 3, padding="VALID"), dense(3)])
    model.init(jax.random.key(0), (2, 1))


@row("apply-empty-batch", ShapeError, "dense layer expected 32 input features, got 16")
def _(ctx):
    model = cnn([conv(4, 3), dense(3)])
    params = model.init(jax.random.key(0), (8, 1))
    assert model.apply(params, np.zeros((0, 8, 1), np.float32)).shape == (0, 3)  # empty output
    model.apply(params, np.zeros((0, 4, 1), np.float32))  # shapes are still checked


# ------------------------------------------------------------------ unknown names


@row("unknown-family", UnknownNameError, "unknown model family 'transformer'; expected one of")
def _(ctx):
    fml.models.from_spec({"family": "transformer"})


@row("unknown-data-set", UnknownNameError, "unknown data set 'imagenet'; expected an embedded set")
def _(ctx):
    fml.data.load("imagenet")


@row("unknown-optimizer", UnknownNameError, "unknown optimizer 'adamz'; expected one of")
def _(ctx):
    fit((X, Y), optimizer="adamz")


@row("unknown-activation", UnknownNameError, "unknown activation 'swishy'; expected one of")
def _(ctx):
    fml.models.mlp([3], activation="swishy")


@row("unknown-loss", UnknownNameError, "unknown loss 'cross'; expected one of")
def _(ctx):
    fit((X, Y), loss="cross")


@row("unknown-rnn-cell", UnknownNameError, "unknown rnn cell 'transformer'; expected one of")
def _(ctx):
    fml.models.rnn("transformer", 4)


# ------------------------------------------------------------------ checkpoints and run directories


def _resume(ctx, model, data, *, epochs=2, batch_size=8):
    """Resumes the run in `ctx.run_dir` with `model` on `data`."""
    return fml.fit(
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        quiet=True,
        checkpoint_dir=ctx.run_dir,
        resume=True,
    )


def _meta_file(ctx) -> pathlib.Path:
    return ctx.run_dir / "checkpoints" / "8" / "meta" / "metadata"


def _edit_meta(ctx, edit, *, resign=True):
    """Edits checkpoint 8's metadata; `resign` recomputes its SHA-256, as a deliberate
    forger would (so the checks behind the checksum are reached)."""
    meta = json.loads(_meta_file(ctx).read_text())
    edit(meta)
    if resign:
        meta["sha256"] = checkpoint.meta_sha256(meta)
    _meta_file(ctx).write_text(json.dumps(meta))


def _array_files(ctx) -> list[pathlib.Path]:
    return sorted((ctx.run_dir / "checkpoints" / "8" / "state" / "d").iterdir())


@row(
    "checkpoint-spec-does-not-match-params",
    CheckpointError,
    "the params of checkpoint step 8 .* do not match its model spec",
)
def _(ctx):
    _edit_meta(ctx, lambda m: m["spec"].update(widths=[16, 3]))
    checkpoint.restore(ctx.run_dir)


@row(
    "checkpoint-truncated",
    CheckpointError,
    "checkpoint step 8 .* is corrupt or truncated .*other checkpoints: \\[6\\]",
)
def _(ctx):
    for path in _array_files(ctx):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    checkpoint.restore(ctx.run_dir)


@row("checkpoint-corrupted", CheckpointError, "checkpoint step 8 .* is corrupt or truncated")
def _(ctx):
    for path in _array_files(ctx):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    checkpoint.restore(ctx.run_dir)


@row("checkpoint-files-missing", CheckpointError, "checkpoint step 8 .* is corrupt or truncated")
def _(ctx):
    shutil.rmtree(ctx.run_dir / "checkpoints" / "8" / "state")
    checkpoint.restore(ctx.run_dir)


@row("checkpoint-metadata-not-json", CheckpointError, "is corrupt or truncated \\(JSONDecodeError")
def _(ctx):
    _meta_file(ctx).write_text('{"spec": ')
    checkpoint.restore(ctx.run_dir)


@row("checkpoint-arrays-fail-checksum", CheckpointError, "its arrays do not match their SHA-256")
def _(ctx):
    _edit_meta(ctx, lambda m: m.update(arrays_sha256="0" * 64))
    checkpoint.restore(ctx.run_dir)


@row(
    "checkpoint-metadata-edited",
    CheckpointError,
    "checkpoint step 8 .* its metadata does not match its SHA-256",
)
def _(ctx):
    _edit_meta(ctx, lambda m: m["history"].update(train_loss=[0.0, 0.0]), resign=False)
    checkpoint.restore(ctx.run_dir)


@row(
    "checkpoint-metadata-wrong-types",
    CheckpointError,
    "metadata entry 'best' should be null or",
)
def _(ctx):
    _edit_meta(ctx, lambda m: m.update(best={"loss": "low", "epoch": 1}))
    _resume(ctx, ctx.model, ctx.data, epochs=3)


@row("checkpoint-of-another-model", CheckpointError, "holds checkpoints of a different model")
def _(ctx):
    _resume(ctx, fml.models.mlp([5, 3]), ctx.data)


@row("resume-with-other-data-or-settings", CheckpointError, r"cannot resume .*batch_size: 8 -> 4")
def _(ctx):
    with pytest.raises(CheckpointError, match="num_examples: 30 -> 29; data_sha256"):
        _resume(ctx, ctx.model, (ctx.data[0][:29], ctx.data[1][:29]))
    _resume(ctx, ctx.model, ctx.data, batch_size=4)


@row("no-such-checkpoint", CheckpointError, r"no checkpoint step 99 .*have \[6, 8\]")
def _(ctx):
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        checkpoint.restore(ctx.run_dir / "elsewhere")
    checkpoint.restore(ctx.run_dir, step=99)


@row(
    "custom-optimizer-not-given-to-restore", CheckpointError, "pass the same optimizer= to restore"
)
def _(ctx):
    tx = fml.train.make_optimizer(optax.sgd(0.1))
    state = fml.train.init_state(ctx.model, tx, (4,))
    config = checkpoint.fit_config(*ctx.data, optimizer=tx, learning_rate=0.1)
    custom = checkpoint.Checkpointer(ctx.run_dir / "custom")
    custom.save(state, {"spec": ctx.model.spec, "config": config})
    _, restored = checkpoint.restore(ctx.run_dir / "custom", optimizer=tx)  # given: fine
    assert int(restored.step) == 0
    checkpoint.restore(ctx.run_dir / "custom")


@row(
    "new-run-into-a-checkpointed-directory",
    CheckpointError,
    "already holds checkpoints .*pass resume=True",
)
def _(ctx):
    fml.fit(ctx.model, ctx.data, epochs=2, batch_size=8, quiet=True, checkpoint_dir=ctx.run_dir)


@row(
    "unwritable-output-directory", CheckpointError, "cannot write checkpoints to .*Not a directory"
)
def _(ctx):
    (ctx.run_dir / "a_file").write_text("")
    fit(ctx.data, checkpoint_dir=ctx.run_dir / "a_file" / "run")


@row("run-directory-params-truncated", CheckpointError, "params.npz is corrupt or truncated")
def _(ctx):
    params = ctx.run_dir / "params.npz"
    params.write_bytes(params.read_bytes()[:100])
    rundir.load_run(ctx.run_dir)


@row("run-directory-spec-does-not-match-params", CheckpointError, "do not match the model spec")
def _(ctx):
    (ctx.run_dir / "spec.json").write_text(json.dumps({**ctx.model.spec, "widths": [9, 3]}))
    rundir.load_run(ctx.run_dir)


@row("run-directory-files-malformed", CheckpointError, r"spec.json: unknown model family \['mlp'\]")
def _(ctx):
    spec, config = ctx.run_dir / "spec.json", ctx.run_dir / "config.json"
    for path, content, match in [
        (spec, b'{"family": "\xff"}', "spec.json is not valid JSON: UnicodeDecodeError"),
        (config, b"[" * 100_000 + b"]" * 100_000, "config.json is not valid JSON: RecursionError"),
        (config, b'[{"input_shape": [4]}]', "config.json: expected a JSON object, got list"),
    ]:
        good = path.read_bytes()
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            rundir.load_run(ctx.run_dir)
        path.write_bytes(good)
    spec.write_text(json.dumps({**ctx.model.spec, "family": ["mlp"]}))
    rundir.load_run(ctx.run_dir)


@row(
    "run-directory-params-not-real-numbers", CheckpointError, r"\.npy has dtype complex64; expected"
)
def _(ctx):
    params = rundir.load_params(ctx.run_dir / "params.npz")
    rundir.save_params(ctx.run_dir / "params.npz", jax.tree.map(lambda a: a + 0j, params))
    rundir.load_run(ctx.run_dir)


@row("run-directory-params-declare-huge-arrays", CheckpointError, r"dense_0/w: expected \(\(4, 8\)")
def _(ctx):
    params = rundir.load_params(ctx.run_dir / "params.npz")
    params["dense_0"]["w"] = np.broadcast_to(np.float32(0), (10_000, 8))  # 320 KB; a bomb: GBs
    rundir.save_params(ctx.run_dir / "params.npz", params)
    rundir.load_run(ctx.run_dir)  # refused from the headers, before any array is read


@row("eval-of-a-run-without-dataset", CheckpointError, "expected a 'dataset' name, got None")
def _(ctx):
    experiment.evaluate_run(ctx.run_dir)


@row("state-dict-float8", CheckpointError, "'dense_0.weight': expected a float tensor")
def _(ctx):
    torch = pytest.importorskip("torch")
    from fml.export import torch as fml_torch

    state = fml_torch.to_state_dict(ctx.model, ctx.params_at_6, (4,))
    state["dense_0.weight"] = state["dense_0.weight"].to(torch.float8_e4m3fn)
    fml_torch.from_state_dict(ctx.model, state, (4,))


@row("state-dict-pt-damaged", CheckpointError, r"expected shape \(8, 4\), got \(9, 4\)")
def _(ctx):
    torch = pytest.importorskip("torch")
    from fml.export import torch as fml_torch

    path = ctx.run_dir / "model.pt"
    state = fml_torch.to_state_dict(ctx.model, ctx.params_at_6, (4,))
    torch.save(state, path)
    good = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    bomb = bytearray(good)  # the central directory's first entry claims 4 GB
    directory = bomb.rindex(b"PK\x01\x02")
    bomb[directory + 24 : directory + 28] = (2**32 - 1).to_bytes(4, "little")
    for content, match in [
        (good[: len(good) // 2], "is not a valid torch.save zip"),
        (deflated.getvalue(), "expected the uncompressed entries torch.save writes"),
        (bytes(bomb), r"declare \d+ bytes, more than the file's"),
    ]:
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            fml_torch.load_state_dict(path)
    state["dense_0.weight"] = torch.zeros(9, 4)
    torch.save(state, path)
    fml_torch.load_state_dict(
        path,
        expected={
            "dense_0.weight": (8, 4),
            "dense_0.bias": (8,),
            "dense_1.weight": (3, 8),
            "dense_1.bias": (3,),
        },
    )


@row("tfds-set-damaged", DataError, r"'mnist' in .* cannot be read .*damaged")
def _(ctx):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = ctx.run_dir.parent / "tfds"
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }
    )
    image = np.zeros((4, 4, 1), np.uint8)
    tfds.dataset_builders.store_as_tfds_dataset(
        "mnist",
        "3.0.1",
        features,
        {s: [(i, {"image": image, "label": i % 3}) for i in range(6)] for s in ("train", "test")},
        data_dir=data_dir,
        disable_shuffling=True,
        file_format="array_record",
    )
    info = data_dir / "mnist" / "3.0.1" / "dataset_info.json"
    good = info.read_bytes()
    no_splits = json.dumps({k: v for k, v in json.loads(good).items() if k != "splits"}).encode()
    for content in (good[: len(good) // 2], b"\xff\xfe garbage", no_splits):
        info.write_bytes(content)
        with pytest.raises(DataError, match=r"'mnist' in .* cannot be read"):
            fml.data.tfds_source("mnist", data_dir=str(data_dir)).read(np.arange(2))
        if content is not no_splits:
            with pytest.raises(DataError, match=r"'mnist' in .* cannot be read"):
                fml.data.load("mnist", data_dir=str(data_dir))
    fml.data.load("mnist", data_dir=str(data_dir))


@row("second-writer-of-a-run-directory", CheckpointError, r"another process \(pid \d+ on host")
def _(ctx):
    code = f"from fml.lock import run_lock; import time\nwith run_lock({str(ctx.run_dir)!r}):\n"
    code += "    print('locked', flush=True); time.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline() == b"locked\n"
        rundir.save_run(ctx.run_dir, model=ctx.model, params=ctx.params_at_6, config={})
    finally:
        holder.kill()
        holder.wait()


@row(
    "disk-full-writing-a-run-directory",
    CheckpointError,
    "could not write .*No space left|too large",
)
def _(ctx):
    params = fml.models.mlp([512, 3]).init(jax.random.key(0), (4,))
    with file_size_limit(4096):
        rundir.save_params(ctx.run_dir / "params.npz", params)


@row("disk-full-writing-an-export", ExportError, "could not write the safetensors export")
def _(ctx):
    pytest.importorskip("torch")
    from fml.export import export

    model = fml.models.mlp([512, 3])
    params = model.init(jax.random.key(0), (4,))
    with file_size_limit(4096):
        export(model, params, ctx.run_dir / "m.safetensors", to="safetensors", input_shape=(4,))


# ------------------------------------------------------------------ command line


@row("cli-bad-arguments", SystemExit, "2")
def _(ctx):
    fml.cli.main(["no-such-command"])


# ------------------------------------------------------------------ the tests


class RunContext(NamedTuple):
    run_dir: pathlib.Path  # a finished run: checkpoints at steps 6 and 8, and params.npz
    model: fml.Model
    data: tuple
    params_at_6: dict


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run: checkpoints at steps 6 and 8, and the run directory files."""
    run_dir = tmp_path_factory.mktemp("bad_input") / "run"
    model = fml.models.mlp([8, 3])
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, 30).astype(np.int32))
    state, history = fml.fit(
        model,
        data,
        epochs=2,
        batch_size=8,
        quiet=True,
        checkpoint_dir=run_dir,
        checkpoint_every=2,
        keep=2,
    )
    config = {"input_shape": [4], "task": "classification"}
    rundir.save_run(run_dir, model=model, params=state.params, config=config, history=history)
    params_at_6 = jax.device_get(checkpoint.restore(run_dir, step=6)[1].params)
    return RunContext(run_dir, model, data, params_at_6)


@pytest.mark.parametrize("name", ROWS)
def test_bad_input(name, finished_run, tmp_path, capsys):
    bad = ROWS[name]
    ctx = finished_run._replace(
        run_dir=pathlib.Path(shutil.copytree(finished_run.run_dir, tmp_path / "run"))
    )
    with pytest.raises(bad.error, match=bad.match) as raised:
        bad.run(ctx)
    if bad.error is SystemExit:
        assert raised.value.code == 2 and "fml: error:" in capsys.readouterr().err
    # Nothing saved is lost: the run's other checkpoint still restores, untouched.
    _, older = checkpoint.restore(ctx.run_dir, step=6)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(older.params), jax.tree.leaves(finished_run.params_at_6))
    )


def test_readme_table_lists_every_row():
    section = README.read_text().split("## Bad input and what it gets")[1].split("\n## ")[0]
    listed = re.findall(r"^\| .* \| `([\w-]+)` \|$", section, flags=re.M)
    assert listed == list(ROWS)
    for name, bad in ROWS.items():
        line = next(l for l in section.splitlines() if f"`{name}`" in l)
        assert bad.error.__name__ in line, (name, line)
