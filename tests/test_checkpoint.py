"""Checkpoints: exact resume (in process and after SIGKILL), restore with no user
code, keep-K, atomic saves, guards against NaN losses and failed writes."""

import concurrent.futures
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fml
from fml import checkpoint
from fml.errors import CheckpointError, TrainingError
from fml.rundir import flatten_params

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _resume_job  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def tiny_classification(n=30, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


def keep_up_to(run_dir, step: int, into) -> pathlib.Path:
    """A copy of `run_dir` holding only the checkpoints up to `step`."""
    into = pathlib.Path(into)
    shutil.copytree(run_dir, into)
    for s in checkpoint.Checkpointer(into).steps():
        if s > step:
            shutil.rmtree(into / checkpoint.CHECKPOINTS / str(s))
    return into


# ------------------------------------------------------------------ exact resume, in process


@pytest.mark.parametrize(
    "fused, resume_steps", [(False, (6, 8)), (True, (6,))], ids=["host", "fused"]
)
def test_resume_mid_epoch_and_at_epoch_end_is_bit_identical(tmp_path, fused, resume_steps):
    # 40 examples, 10 held out: 30 to train in batches of 8, 4 steps per epoch (the last padded).
    data = tiny_classification(n=40)
    model = fml.models.mlp([8, 3], dropout=0.2)
    kwargs = dict(
        epochs=3, batch_size=8, seed=1, fused=fused, quiet=True, validation=0.25, patience=1
    )
    plain, plain_history = fml.fit(model, data, **kwargs)
    run = tmp_path / "run"
    full, history = fml.fit(
        model, data, checkpoint_dir=run, checkpoint_every=2, keep=None, **kwargs
    )
    # Checkpoints change nothing: the run equals the one without them.
    assert tree_equal(jax.device_get(full.params), jax.device_get(plain.params))
    assert history["train_loss"] == plain_history["train_loss"]
    assert checkpoint.Checkpointer(run).steps() == [2, 4, 6, 8, 10, 12]
    for step in resume_steps:  # 6: mid-epoch 1 (after its 2nd batch); 8: the end of epoch 1
        resumed, resumed_history = fml.fit(
            model,
            data,
            checkpoint_dir=keep_up_to(run, step, tmp_path / f"from{step}"),
            checkpoint_every=2,
            keep=None,
            resume=True,
            **kwargs,
        )
        assert int(resumed.step) == 12
        assert tree_equal(jax.device_get(resumed.params), jax.device_get(full.params))
        assert tree_equal(jax.device_get(resumed.opt_state), jax.device_get(full.opt_state))
        assert {k: v for k, v in resumed_history.items() if k != "epoch_time"} == {
            k: v for k, v in history.items() if k != "epoch_time"
        }


def _wait_for_checkpoint(run_dir: pathlib.Path, step: int, process, timeout=120.0) -> int:
    """Polls until `run_dir` has a checkpoint at `step` or later; returns the latest."""
    directory = run_dir / checkpoint.CHECKPOINTS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if directory.is_dir():
            steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.01)
    raise AssertionError(
        f"no checkpoint >= {step} in {run_dir}; the job exited with {process.poll()}"
    )


def _launch(family, run_dir, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    script = pathlib.Path(_resume_job.__file__)
    return subprocess.Popen(
        [sys.executable, str(script), family, str(run_dir), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_and_resume(family, run_dir, out, kill_after, jitter) -> tuple[int, subprocess.Popen]:
    """Starts the job, SIGKILLs it once a checkpoint >= `kill_after` exists (plus
    `jitter` seconds), and starts it again; returns the step it was killed at and
    the resumed process."""
    process = _launch(family, run_dir, out)
    _wait_for_checkpoint(run_dir, kill_after, process)
    time.sleep(jitter)  # lands in a step or in the middle of a save
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, f"{family} finished before it was killed"
    return checkpoint.latest_step(run_dir), _launch(family, run_dir, out)


def test_sigkilled_runs_resume_to_bit_identical_params(tmp_path):
    """MLP (dropout), CNN (fused epochs) and GRU runs killed with SIGKILL at a random
    step, then resumed by the same command in a new process, end with the params of
    the run left alone (computed here, without checkpoints)."""
    rng = random.Random()
    families = ("mlp", "cnn", "gru")
    with concurrent.futures.ThreadPoolExecutor(len(families)) as pool:
        # The three jobs run side by side while this process trains the references.
        futures = {
            f: pool.submit(
                _kill_and_resume,
                f,
                tmp_path / f,
                tmp_path / f"{f}.npz",
                rng.randint(1, _resume_job.STEPS - 3),
                rng.uniform(0.0, 0.15),
            )
            for f in families
        }
        reference = {f: _resume_job.train(f)[0] for f in families}
        for family in families:
            killed_at, process = futures[family].result()
            assert 1 <= killed_at < _resume_job.STEPS, (family, killed_at)
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr.decode()[-2000:]
            with np.load(tmp_path / f"{family}.npz") as f:
                resumed = {k: f[k] for k in f.files}
            expected = flatten_params(reference[family].params)
            assert resumed.keys() == expected.keys()
            for name in expected:
                np.testing.assert_array_equal(
                    resumed[name], expected[name], err_msg=f"{family} {name}, killed at {killed_at}"
                )


# ------------------------------------------------------------------ restore, keep, atomicity


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished checkpointed run: MLP, 2 epochs of 4 steps, a checkpoint every 2 steps."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    model = fml.models.mlp([8, 3])
    data = tiny_classification()
    state, _ = fml.fit(
        model,
        data,
        optimizer="momentum",
        learning_rate=0.05,
        clip_norm=1.0,
        epochs=2,
        batch_size=8,
        quiet=True,
        checkpoint_dir=run_dir,
        checkpoint_every=2,
        keep=2,
    )
    return run_dir, model, data, jax.device_get(state)


def test_restore_rebuilds_model_and_whole_state_with_no_user_code(run):
    run_dir, model, _, final = run
    restored_model, state = checkpoint.restore(run_dir)
    assert restored_model.spec == model.spec
    assert int(state.step) == 8
    assert tree_equal(jax.device_get(state.params), final.params)
    assert tree_equal(jax.device_get(state.opt_state), final.opt_state)
    assert tree_equal(jax.device_get(state.hparams), final.hparams)
    assert jax.random.key_impl(state.key) == jax.random.key_impl(final.key)
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(final.key))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(
        restored_model.apply(state.params, x), model.apply(final.params, x)
    )
    # keep=2: the last two of the checkpoints at steps 2, 4, 6, 8; older ones by step.
    assert checkpoint.Checkpointer(run_dir, read_only=True).steps() == [6, 8]
    _, older = checkpoint.restore(run_dir, step=6)
    assert int(older.step) == 6 and not tree_equal(jax.device_get(older.params), final.params)


def test_a_cosine_schedule_is_recorded_and_rebuilt_by_restore(tmp_path):
    model, data = fml.models.mlp([8, 3]), tiny_classification()
    schedule = fml.step.make_schedule("cosine", 0.05, 8)
    options = dict(epochs=2, batch_size=8, quiet=True, checkpoint_dir=tmp_path / "run")
    state, _ = fml.fit(model, data, optimizer="adam", learning_rate=schedule, **options)
    meta = checkpoint.Checkpointer(tmp_path / "run", read_only=True).read_meta(8)
    assert meta["config"]["learning_rate"] == {
        "schedule": "cosine",
        "learning_rate": 0.05,
        "steps": 8,
    }
    _, restored = checkpoint.restore(tmp_path / "run")  # no optimizer= needed
    assert tree_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    # the closed form of the rate the last step used: 0.05 (1 + cos(7 pi / 8)) / 2
    last = float(restored.opt_state.hyperparams["learning_rate"])
    np.testing.assert_allclose(last, 0.05 * (1 + np.cos(7 * np.pi / 8)) / 2, rtol=1e-5)
    # resuming under another schedule would change the trajectory: refused
    longer = fml.step.make_schedule("cosine", 0.05, 16)
    with pytest.raises(CheckpointError, match="learning_rate"):
        fml.fit(model, data, optimizer="adam", learning_rate=longer, resume=True, **options)


def test_failed_save_leaves_previous_checkpoint_intact(run, tmp_path, monkeypatch):
    """Disk full in the middle of a save: a clear error, and the last checkpoint
    still restores (keep=1 must not have deleted it)."""
    import errno

    from orbax.checkpoint import JsonCheckpointHandler

    run_dir = pathlib.Path(shutil.copytree(run[0], tmp_path / "run"))
    checkpoints = checkpoint.Checkpointer(run_dir, keep=1)
    restored = checkpoints.restore()

    async def disk_full(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", disk_full)
    later = restored.state._replace(step=restored.state.step + 1)
    with pytest.raises(
        # orbax's clean-up of the half-written step can race the injected error and
        # report ENOTEMPTY or NOT_FOUND instead of ENOSPC; either way the message
        # names both steps.
        CheckpointError,
        match=r"step 9 .*(No space left|Directory not empty|NOT_FOUND).*last good checkpoint is "
        r"step 8",
    ):
        checkpoints.save(later, restored.meta)
    monkeypatch.undo()
    assert checkpoints.steps() == [6, 8]
    again = checkpoint.Checkpointer(run_dir, read_only=True).restore()
    assert again.step == 8 and tree_equal(again.state.params, restored.state.params)
    # A new writer (say, the resumed run) clears the half-written step and saves it.
    checkpoint.Checkpointer(run_dir, keep=1).save(later, restored.meta)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["9"]


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        fml.fit(
            fml.models.mlp([3]), tiny_classification(), quiet=True, checkpoint_dir=blocker / "run"
        )
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores the mode: refuse the write as the OS would
        original = pathlib.Path.write_bytes

        def refuse(path, data):
            if read_only in path.parents:
                raise PermissionError(13, "Permission denied", str(path))
            return original(path, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    with pytest.raises(CheckpointError, match="Permission denied"):
        fml.fit(fml.models.mlp([3]), tiny_classification(), quiet=True, checkpoint_dir=read_only)


def test_new_run_refuses_a_directory_with_checkpoints(run, tmp_path):
    run_dir = pathlib.Path(shutil.copytree(run[0], tmp_path / "run"))
    with pytest.raises(
        CheckpointError, match=r"already holds checkpoints \(latest step 8\).*resume=True"
    ):
        fml.fit(run[1], run[2], epochs=2, batch_size=8, quiet=True, checkpoint_dir=run_dir)
    assert checkpoint.Checkpointer(run_dir).steps() == [6, 8]


def test_replicated_and_sharded_states_save_and_restore(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = fml.models.mlp([8, 3])
    tx = fml.train.make_optimizer("adam", 1e-3)
    state = fml.train.init_state(model, tx, (4,))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    # The first layer's weights split over the devices by output unit.
    sharded_w = jax.device_put(
        state.params["dense_0"]["w"], NamedSharding(mesh, PartitionSpec(None, "data"))
    )
    params = {**replicated.params, "dense_0": {**replicated.params["dense_0"], "w": sharded_w}}
    parallel = replicated._replace(params=params)
    assert len(parallel.params["dense_0"]["w"].sharding.device_set) == len(jax.devices())
    meta = {
        "spec": model.spec,
        "config": {"optimizer": "adam", "learning_rate": 1e-3, "input_shape": [4]},
    }
    checkpoint.Checkpointer(tmp_path).save(parallel, meta)
    _, restored = checkpoint.restore(tmp_path)
    assert tree_equal(jax.device_get(restored.params), jax.device_get(state.params))
    assert tree_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    again = jax.device_put(restored.params, NamedSharding(mesh, PartitionSpec()))
    assert tree_equal(jax.device_get(again), jax.device_get(state.params))


# ------------------------------------------------------------------ guards


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = (10 * rng.normal(size=(32, 3))).astype(np.float32)
    y = x.sum(1).astype(np.float32)
    run_dir = tmp_path / "run"
    # Plain SGD at this rate multiplies the error by ~|1 - 2 lr ||x||²| each step: inf soon.
    with pytest.raises(TrainingError) as error:
        fml.fit(
            fml.models.linear_regression(1),
            (x, y),
            optimizer="sgd",
            learning_rate=0.5,
            epochs=50,
            batch_size=8,
            quiet=True,
            checkpoint_dir=run_dir,
            checkpoint_every=1,
            keep=2,
        )
    last = checkpoint.latest_step(run_dir)
    message = str(error.value)
    assert (
        f"last good checkpoint is step {last} in {run_dir / 'checkpoints' / str(last)}" in message
    )
    assert ("loss became" in message and f"in step {last + 1} " in message) or (
        f"params became NaN or inf by step {last + 1}" in message
    )
    model, state = checkpoint.restore(run_dir)
    assert int(state.step) == last and checkpoint._all_finite(jax.device_get(state.params))


def test_clip_norm_clips_the_global_gradient_norm():
    """One full-batch SGD step with clip_norm against the closed-form gradient of
    the mean squared error, clipped by hand in numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = (5.0 + 3.0 * x[:, 0]).astype(np.float32)
    model = fml.models.linear_regression(1)
    lr, clip = 0.1, 0.5
    w0 = fml.train.init_state(model, fml.train.make_optimizer("sgd", lr), (3,), seed=0).params
    state, _ = fml.fit(
        model,
        (x, y),
        optimizer="sgd",
        learning_rate=lr,
        clip_norm=clip,
        epochs=1,
        batch_size=16,
        quiet=True,
    )
    (name,) = w0
    w, b = np.asarray(w0[name]["w"], np.float64), np.asarray(w0[name]["b"], np.float64)
    residual = x @ w + b - y[:, None]  # [16, 1]
    grad_w, grad_b = 2 * x.T @ residual / 16, 2 * residual.sum(0) / 16
    norm = np.sqrt((grad_w**2).sum() + (grad_b**2).sum())
    assert norm > 5 * clip  # the clip is active
    scale = clip / norm
    np.testing.assert_allclose(
        state.params[name]["w"], w - lr * scale * grad_w, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        state.params[name]["b"], b - lr * scale * grad_b, rtol=1e-5, atol=1e-6
    )
