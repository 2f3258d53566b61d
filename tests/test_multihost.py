"""Two processes x 4 CPU devices joined on 127.0.0.1 train like one process with 8,
and failures to join are clear errors within a bounded time.

Each process runs `tests/parallel_cases.py` (spawned here, killed if still alive
at the end, under a deadline).
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from parallel_cases import MULTIHOST_CASES, case_name, train

from fml import rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "parallel_cases.py"
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(local_devices, out_dir, *, num_processes=None, timeout_s=30, deadline_s=240):
    """Starts one process per entry of `local_devices`; returns `[(returncode, stderr)]`
    once all have exited, killing every one still running after `deadline_s`."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    n = num_processes or len(local_devices)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                str(port),
                str(n),
                str(pid),
                str(devices),
                str(out_dir / f"process{pid}"),
                str(timeout_s),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid, devices in enumerate(local_devices)
    ]
    deadline = time.monotonic() + deadline_s
    try:
        return [
            (p.wait(timeout=max(1.0, deadline - time.monotonic())), p.stderr.read()) for p in procs
        ]
    finally:
        reap(procs)


def reap(procs) -> None:
    """Kills every process of `procs` still running and closes their pipes."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    results = launch([4, 4], out)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    return out


@pytest.mark.parametrize("family,launcher,fused", MULTIHOST_CASES)
def test_two_processes_match_one_process(two_processes, family, launcher, fused, record_property):
    """Host-fed and fused (each process gathering its columns of every batch)."""
    run = two_processes / "process0" / case_name(family, launcher, fused)
    params = rundir.load_params(run / "params.npz")
    one_process = train(family, launcher, fused)  # 8 devices in this process
    diffs = [np.max(np.abs(params[k][p] - v)) for k in params for p, v in one_process[k].items()]
    record_property("max_abs_diff", float(max(diffs)))
    assert max(diffs) <= TOLERANCE


def test_only_process_zero_writes(two_processes):
    assert len(list((two_processes / "process0").iterdir())) == len(MULTIHOST_CASES)
    assert not (two_processes / "process1").exists()


def test_failures_to_join_are_clear_and_bounded(tmp_path):
    # Both cases at once, to spend their waiting time together.
    started = time.monotonic()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    lonely = subprocess.Popen(  # process 0 of 2; process 1 never comes
        [sys.executable, str(SCRIPT), str(port), "2", "0", "1", str(tmp_path / "lonely"), "2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        mismatched = launch([4, 3], tmp_path, deadline_s=120)
        _, lonely_err = lonely.communicate(timeout=120)
    finally:
        lonely.kill()
        lonely.wait()
    for code, stderr in mismatched:
        assert code == 3, stderr[-3000:]
        assert (
            "same number of devices in every process; got devices per process {0: 4, 1: 3}"
            in stderr
        )
    assert lonely.returncode != 0
    assert "process 0 of 2 waited 2 s for all 2 processes to join the coordinator" in lonely_err
    assert time.monotonic() - started < 120


FAULTS = ROOT / "tests" / "_multihost_faults.py"


def launch_faults(told, mode, *, deadline_s=90):
    """Process `i` is told `told[i]` processes; returns `[(returncode, stderr, seconds)]`."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(FAULTS), str(port), str(n), str(pid), mode],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid, n in enumerate(told)
    ]
    results = []
    try:
        for p in procs:
            code = p.wait(timeout=max(1.0, started + deadline_s - time.monotonic()))
            results.append((code, p.stderr.read(), time.monotonic() - started))
    finally:
        reap(procs)
    return results


def test_processes_told_different_process_counts_both_refuse():
    # Process 0 is told 2 processes, process 1 is told 3: before, both trained to exit 0.
    (code0, err0, _), (code1, err1, seconds) = launch_faults([2, 3], "join")
    assert code0 == code1 == 3, (err0[-2000:], err1[-2000:])
    assert "process 0 of 2: processes disagree on the run's shape" in err0
    assert "process 1 has {'num_processes': 3, 'devices': 2}" in err0
    assert "process 1 of 3: processes disagree" in err1
    assert seconds < 60


def test_a_dead_peer_ends_the_survivor_within_the_heartbeat_timeout():
    # Process 1 dies right after joining; process 0 is in training. Before: JAX's
    # default 100 s heartbeat timeout. Here 5 s: JAX's coordinator ends process 0
    # (from C++: a non-zero exit, not a Python exception) within seconds.
    (code0, err0, seconds), (code1, _, _) = launch_faults([2, 2], "die")
    assert code1 == 0
    assert code0 != 0 and "stopped sending heartbeats" in err0, err0[-2000:]
    assert seconds < 60
