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
