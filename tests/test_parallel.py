"""Data parallelism on 8 simulated CPU devices equals training on one device."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export
from jax.sharding import PartitionSpec as P
from parallel_cases import data, families, train

import fml
from experiments import scaling
from fml import batching, parallel
from fml.errors import ConfigError, DistributedError, UnknownNameError
from fml.step import (
    init_state,
    make_full_batch_iterations,
    make_objective,
    make_optimizer,
    make_train_step,
    summed_over_replicas,
)

TOLERANCE = 1e-5


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_eight_devices_are_there():
    assert jax.device_count() == 8


# shard_map (the default launcher) host-fed and fused, pmap host-fed, for each
# family; pmap fused for the MLP.
CASES = [(f, "shard_map", fused) for f in ("mlp", "cnn", "lstm") for fused in (False, True)]
CASES += [(f, "pmap", False) for f in ("mlp", "cnn", "lstm")] + [("mlp", "pmap", True)]


@pytest.mark.parametrize("family,launcher,fused", CASES)
def test_eight_devices_match_one_device(family, launcher, fused, record_property):
    one_device = train(family)
    eight = train(family, launcher, fused)
    record_property("max_abs_diff", max_abs_diff(eight, one_device))
    assert max_abs_diff(eight, one_device) <= TOLERANCE
    # and training moved the params by far more than the tolerance
    init = families()[family].init(jax.random.split(jax.random.key(0))[0], data()[0].shape[1:])
    assert max_abs_diff(one_device, init) > 1e-2


@pytest.mark.parametrize("family", ["mlp", "cnn", "lstm"])
def test_pmap_matches_shard_map(family, record_property):
    record_property("max_abs_diff", max_abs_diff(train(family, "pmap"), train(family, "shard_map")))
    assert max_abs_diff(train(family, "pmap"), train(family, "shard_map")) <= TOLERANCE


@pytest.mark.parametrize("launcher,fused,devices", [("pmap", True, None), ("shard_map", False, 3)])
def test_uneven_batch_is_padded_with_mask(launcher, fused, devices):
    # 10 examples per step on 8 (or 3) devices: padded to 16 (or 12) with mask-0 rows.
    padded = train("mlp", launcher, fused, batch_size=10, devices=devices)
    assert max_abs_diff(padded, train("mlp", batch_size=10)) <= TOLERANCE


@pytest.mark.parametrize("launcher", ["shard_map", "pmap"])
def test_fused_epochs_give_each_device_its_rows_only(launcher):
    """Fused data-parallel epochs hold 1/8 of the data on each of 8 devices: its
    columns of every batch of the epoch, in the batch order of one device
    (`fml.batching.epoch_indices`). Before, every device held all of x and y."""
    x, y = data()  # 320 examples, batches of 16: 20 steps of 2 rows per device
    runner = parallel.data_parallel(launcher).fused_runner(
        (None,), x, y, seed=3, batch_size=16, drop_remainder=False, shuffle=True
    )
    placed = runner.batches(1, 0, runner.steps_per_epoch)
    index_SxB, mask_SxB = jax.device_get(batching.epoch_indices(batching.epoch_key(3, 1), 320, 16))
    for got, want in zip(placed, (x[index_SxB], y[index_SxB], mask_SxB)):
        assert len(got.addressable_shards) == 8
        for shard in got.addressable_shards:
            assert shard.data.nbytes == want.nbytes // 8
        got = np.asarray(got)
        if launcher == "pmap":  # [devices, steps, rows per device, ...]
            got = np.moveaxis(got, 0, 1).reshape(want.shape)
        np.testing.assert_array_equal(got, want)
    assert placed[0].addressable_shards[0].data.nbytes == x.nbytes // 8 == 1280


@pytest.mark.parametrize(
    "model,loss,optimizer",
    [
        (fml.models.svm(3, C=1.0), None, "sgd"),
        (fml.models.linear_regression(1), "mse", "adam"),
    ],
    ids=["svm-hinge-l2", "linear-mse"],
)
def test_other_families_and_losses_match(model, loss, optimizer):
    x, y = data(100)
    if loss == "mse":
        y = x[:, :3, 0].sum(axis=1)
    kwargs = dict(optimizer=optimizer, epochs=2, batch_size=30, loss=loss, quiet=True)
    one, _ = fml.fit(model, (x, y), **kwargs)
    eight, _ = fml.fit(model, (x, y), parallel="shard_map", **kwargs)
    assert max_abs_diff(eight.params, one.params) <= TOLERANCE
    assert (
        max_abs_diff(one.params, model.init(jax.random.split(jax.random.key(0))[0], (8, 1))) > 1e-3
    )


def test_pad_batch_appends_masked_copies_of_row_zero():
    batch = {"x": np.arange(6.0).reshape(3, 2), "y": np.array([4, 5, 6]), "mask": np.ones(3)}
    padded = parallel.pad_batch(batch, 4)
    np.testing.assert_array_equal(padded["x"], [[0, 1], [2, 3], [4, 5], [0, 1]])
    np.testing.assert_array_equal(padded["y"], [4, 5, 6, 4])
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0])
    assert parallel.pad_batch(batch, 3) == batch


def test_shard_batch_lays_rows_out_per_device():
    mesh = parallel.data_mesh()
    batch = parallel.shard_batch({"x": np.arange(13.0), "y": np.arange(13)}, mesh)
    assert batch["x"].shape == (16,)
    assert [s.data.shape for s in batch["x"].addressable_shards] == [(2,)] * 8
    np.testing.assert_array_equal(batch["mask"], [1] * 13 + [0] * 3)
    stacked = parallel.shard_batch({"x": np.arange(16.0)}, mesh, stacked=True)
    np.testing.assert_array_equal(stacked["x"], np.arange(16.0).reshape(8, 2))


def test_devices_argument():
    assert parallel.data_mesh(4).size == 4
    assert parallel.data_mesh(jax.devices()[2:5]).devices.tolist() == jax.devices()[2:5]


@pytest.mark.parametrize("devices", [0, 9, "all", [jax.devices()[0]] * 2])
def test_bad_devices_are_rejected(devices):
    with pytest.raises(ConfigError, match="devices"):
        parallel.data_mesh(devices)


@pytest.mark.parametrize("launcher", ["shard_map", "pmap"])
def test_full_batch_optimizer_is_refused_on_cpu_only(launcher):
    """lbfgs under `parallel` is refused where its collectives deadlock (XLA:CPU), and
    only there: the message names the platform."""
    assert fml.train.FULL_BATCH_DEADLOCKS_ON == "cpu" == jax.devices()[0].platform
    with pytest.raises(ConfigError, match="full-batch: under data parallelism on 'cpu' devices"):
        fml.fit(families()["mlp"], data(16), optimizer="lbfgs", parallel=launcher, quiet=True)


def _full_batch_iterations(model, axis_name=None):
    tx = make_optimizer("lbfgs", 1.0)
    objective = make_objective(model, task="classification")
    step = make_train_step(model, objective, tx, axis_name=axis_name)
    iterations = make_full_batch_iterations(model, objective, tx, step, axis_name=axis_name)
    return functools.partial(iterations, capacity=16), init_state(model, tx, (8, 1))


@pytest.mark.parametrize("family", ["mlp", "logistic_regression"])
def test_parallel_lbfgs_takes_the_one_device_steps(family):
    """The per-replica lbfgs program on 8 replicas of 8 rows (run under `vmap`, whose
    collectives cannot deadlock) takes the one-device iterates on the 64 rows: 10
    steps, params within 1e-5 (measured MLP 1.7e-6) after moving more than 0.5. The
    MLP steps with `train_step`, logistic regression reuses the line search's
    gradient (`make_full_batch_iterations`)."""
    model = {**families(), "logistic_regression": fml.models.logistic_regression(3)}[family]
    x, y = data(64)
    mask = np.ones(64, np.float32)
    iterations, state = _full_batch_iterations(model)
    one, *_ = jax.jit(iterations)(state, x, y, mask, 10, -1.0)
    per_replica, _ = _full_batch_iterations(model, parallel.AXIS)
    replicas = jax.vmap(per_replica, in_axes=(None, 0, 0, 0, None, None), axis_name=parallel.AXIS)
    eight, _, ran, _ = replicas(
        state, x.reshape(8, 8, 8, 1), y.reshape(8, 8), mask.reshape(8, 8), 10, -1.0
    )
    assert ran.tolist() == [10] * 8
    assert max_abs_diff(jax.tree.map(lambda a: a[3], eight.params), one.params) <= TOLERANCE
    assert max_abs_diff(one.params, state.params) > 0.5  # measured 2.0 and 0.82


def test_summed_over_replicas_differentiates_the_global_sum():
    """Under the launchers' `shard_map(check_vma=False)` a psum's gradient is this
    replica's term alone (0 on replica 0 here); `summed_over_replicas`' is the sum's."""
    mesh = parallel.data_mesh()
    x = np.arange(8.0, dtype=np.float32)

    def grads(p, x):
        plain = jax.grad(lambda p: jax.lax.psum(jnp.sum(p * x**2), parallel.AXIS))(p)
        summed = jax.grad(summed_over_replicas(lambda p: jnp.sum(p * x**2), parallel.AXIS))(p)
        return plain, summed

    specs = (P(), P(parallel.AXIS))
    run = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
    plain, summed = run(np.float32(1.0), x)
    assert float(plain) == 0.0 and float(summed) == float(np.sum(x**2)) == 140.0


@pytest.mark.parametrize("program", ["fused", "lbfgs"])
def test_parallel_programs_lower_for_gpus(program):
    """Where they run, the data-parallel fused epoch (batches sharded on axis 1) and
    lbfgs (rows sharded on axis 0) shard_map programs over the 8 devices export for
    cuda: 8 devices, all-reduces inside the loop."""
    model = families()["mlp"]
    dp = parallel.data_parallel("shard_map")
    x, y = data(64)
    if program == "lbfgs":
        iterations, state = _full_batch_iterations(model, parallel.AXIS)
        compiled = dp.compile(iterations, (P(), *[P(parallel.AXIS)] * 3, P(), P()))
        args = (state, x, y, np.ones(64, np.float32), np.int32(10), np.float32(-1.0))
    else:
        tx = make_optimizer("adam", 1e-3)
        step = make_train_step(model, make_objective(model), tx, axis_name=parallel.AXIS)
        (compiled,) = dp.programs(step, fused=True)
        state = init_state(model, tx, (8, 1))
        args = (state, x.reshape(4, 16, 8, 1), y.reshape(4, 16), np.ones((4, 16), np.float32))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
    exported = jax_export.export(compiled, platforms=("cuda",))(*shapes)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",) and exported.nr_devices == 8
    assert text.count("stablehlo.while") >= 1 and text.count("all_reduce") >= 2
    # each device's block: 8 of the 64 rows, or 2 of each of the 4 batches' 16
    assert ("tensor<8x8x1xf32>" if program == "lbfgs" else "tensor<4x2x8x1xf32>") in text


def test_unknown_launcher():
    with pytest.raises(UnknownNameError, match="'pjit'"):
        fml.fit(families()["mlp"], data(16), parallel="pjit", quiet=True)


def test_unreachable_coordinator_fails_in_bounded_time():
    free_port = _closed_port()
    started = time.monotonic()
    with pytest.raises(DistributedError, match=f"coordinator at 127.0.0.1:{free_port} within 1 s"):
        parallel.initialize(f"127.0.0.1:{free_port}", 2, 1, timeout_s=1.0)
    assert time.monotonic() - started < 3.0


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ cluster settings


def test_single_process_without_settings(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_JOB_ID", "TPU_WORKER_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.cluster_from_environment(env={}) == (None, 1, 0, "single process")
    assert parallel.initialize() == (None, 1, 0, "single process")


def test_local_device_ids_reach_jax(monkeypatch):
    """A SLURM task with 4 GPUs: `local_device_ids=range(4)` is handed to
    `jax.distributed.initialize` as [0, 1, 2, 3] (else JAX drives GPU
    SLURM_LOCALID only); bad ids are a ConfigError before JAX is touched."""
    calls = []

    def fake_initialize(*args, **kwargs):
        calls.append(kwargs["local_device_ids"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep the CPU collectives
    settings = ("127.0.0.1:1", 2, 0)
    with pytest.raises(DistributedError, match="stop here"):
        parallel.initialize(*settings, local_device_ids=range(4), timeout_s=1)
    assert calls == [[0, 1, 2, 3]]
    for bad in ([], [0, 0], [-1], "0,1", [0.0]):
        with pytest.raises(ConfigError, match="local_device_ids as distinct non-negative ints"):
            parallel.initialize(*settings, local_device_ids=bad)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "env,expected",
    [
        (
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.5:1234", "JAX_NUM_PROCESSES": "4",
             "JAX_PROCESS_ID": "3"},
            ("10.0.0.5:1234", 4, 3, "JAX_* variables"),
        ),
        (
            {"SLURM_JOB_ID": "4097", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
             "SLURM_STEP_NODELIST": "gpu[017-020,031],cpu1"},
            ("gpu017:61441", 8, 5, "SLURM"),
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_JOB_NODELIST": "a1,a2", "JAX_COORDINATOR_PORT": "999"},
            ("a1:999", 2, 1, "SLURM"),
        ),
        (
            {"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"},
            ("t-0:8482", 4, 2, "TPU pod"),
        ),
    ],
    ids=["kubeflow-jax-vars", "slurm-range", "slurm-list-port", "gke-tpu"],
)  # fmt: skip
def test_cluster_from_environment(env, expected):
    assert tuple(parallel.cluster_from_environment(env=env)) == expected


def test_arguments_override_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}
    cluster = parallel.cluster_from_environment(process_id=2, env=env)
    assert cluster == ("h:1", 4, 2, "arguments and JAX_* variables")


@pytest.mark.parametrize(
    "kwargs,env,match",
    [
        ({"coordinator_address": "h:1"}, {}, "missing num_processes, process_id"),
        ({}, {"JAX_NUM_PROCESSES": "two", "JAX_COORDINATOR_ADDRESS": "h:1",
              "JAX_PROCESS_ID": "0"}, "num_processes as an int .*'two'"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
         "0 <= process_id < num_processes=2, got 2"),
        ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {}, "host:port"),
    ],
)  # fmt: skip
def test_bad_cluster_settings(kwargs, env, match):
    with pytest.raises(ConfigError, match=match):
        parallel.cluster_from_environment(**kwargs, env=env)


# ------------------------------------------------------------------ throughput


def test_scaling_efficiency_closed_form():
    rows = [
        {"devices": 1, "samples_per_s": 1000.0},
        {"devices": 4, "samples_per_s": 3000.0},
    ]
    out = scaling.scaling(rows)
    assert [r["samples_per_s_per_device"] for r in out] == [1000.0, 750.0]
    assert [r["efficiency"] for r in out] == [1.0, 0.75]


def test_data_parallel_report_times_the_same_work():
    report = scaling.data_parallel_report(
        "logistic_regression", device_counts=[1, 8], per_device_batch=3, steps=2, repeats=1
    )
    assert [r["batch_size"] for r in report["scaling"]] == [3, 24]
    for row in report["scaling"]:
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["seconds_per_step"])
    for row in report["overhead"]:
        # the parallel and the single-device step reached the same loss
        assert row["loss_difference"] <= TOLERANCE
        assert row["overhead"] == pytest.approx(row["parallel_seconds"] / row["single_seconds"] - 1)
    assert "| 8 | 24 |" in scaling.markdown(report)


@pytest.mark.parametrize("launcher", ["shard_map", "pmap"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_second_parallel_fit_compiles_nothing(launcher, fused, backend_compiles):
    """The per-replica programs are reused across `fit` calls of the same model (a new
    learning rate is state, not a constant)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int32)
    model = fml.models.mlp([8, 3])
    kwargs = dict(epochs=1, batch_size=16, parallel=launcher, fused=fused, quiet=True)
    fml.fit(model, (x, y), learning_rate=1e-2, **kwargs)
    compiles = backend_compiles()
    state, _ = fml.fit(model, (x, y), learning_rate=3e-2, **kwargs)
    assert compiles == [] and int(state.step) == 3
