"""Throughput of the data-parallel train step: samples/s per device, scaling
efficiency against one device at the same per-device batch, and the overhead of
the parallel step against one device doing the same total work.

`experiments/data_parallel.py` is the command line around `data_parallel_report`.
"""

import statistics
import time

import jax
import numpy as np

from fml import models, parallel
from fml.models import presets
from fml.train import init_state, make_objective, make_optimizer, make_train_step

INPUT_SHAPE = (40, 1)  # MNIST-1D's
NUM_CLASSES = 10

FAMILIES = {
    "mlp": presets.mnist1d_mlp,
    "cnn": presets.mnist1d_cnn,
    "gru": presets.mnist1d_gru,
    "lstm": lambda: models.rnn("lstm", 64, num_classes=NUM_CLASSES),
    "logistic_regression": lambda: models.logistic_regression(NUM_CLASSES),
    "svm": lambda: models.svm(NUM_CLASSES),
    "linear_regression": lambda: models.linear_regression(1),
}


def _batch(model, size: int, seed: int) -> dict:
    """Random inputs of MNIST-1D's shape; labels, or targets for regression."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, *INPUT_SHAPE)).astype(np.float32)
    if model.family == "linear_regression":
        y = rng.normal(size=size).astype(np.float32)
    else:
        y = rng.integers(0, NUM_CLASSES, size).astype(np.int32)
    return {"x": x, "y": y, "mask": np.ones(size, np.float32)}


def time_step(step, state, batch, *, steps: int, repeats: int):
    """Median and spread of seconds per step over `repeats` runs of `steps` steps,
    after one compiling call; also the last loss."""
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        runs.append((time.perf_counter() - started) / steps)
    return statistics.median(runs), (min(runs), max(runs)), metrics["loss"]


def measure(family: str, *, devices: int | None, batch_size: int, launcher: str = "shard_map",
            steps: int = 10, repeats: int = 5, seed: int = 0) -> dict:  # fmt: skip
    """Seconds per train step of `family` on a global batch of `batch_size`.

    Args:
      family: a key of `FAMILIES`.
      devices: data parallelism over the first `devices` devices with
        `launcher`, or None for the plain jitted step on one device.
      batch_size: the global batch.
      steps, repeats: timed steps per run, and runs (the median is reported).

    Returns:
      `{"devices", "batch_size", "seconds_per_step", "spread", "samples_per_s",
      "loss"}`; `loss` is the loss of the last step, the same whichever way the
      step was run.
    """
    model = FAMILIES[family]()
    objective = make_objective(
        model, task="regression" if family == "linear_regression" else "classification"
    )
    tx = make_optimizer("adam", 1e-3)
    state = init_state(model, tx, INPUT_SHAPE, seed=seed)
    batch = _batch(model, batch_size, seed)
    if devices is None:
        step = jax.jit(make_train_step(model, objective, tx), donate_argnums=0)
        batch = jax.device_put(batch)
    else:
        dp = parallel.data_parallel(launcher, devices)
        step = dp.step(make_train_step(model, objective, tx, axis_name=parallel.AXIS))
        state, batch = dp.replicate(state), dp.put_batch(batch)
        step = _local_loss(step, dp)
    seconds, spread, loss = time_step(step, state, batch, steps=steps, repeats=repeats)
    return {
        "devices": devices or 1,
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "spread": spread,
        "samples_per_s": batch_size / seconds,
        "loss": float(loss),
    }


def _local_loss(step, dp):
    def run(state, batch):
        state, metrics = step(state, batch)
        return state, dp.local(metrics)

    return run


def scaling(rows: list[dict]) -> list[dict]:
    """Adds samples/s per device and efficiency = that over the one-device figure
    (rows at the same per-device batch; the first row is the baseline)."""
    base = rows[0]["samples_per_s"] / rows[0]["devices"]
    return [
        {
            **row,
            "samples_per_s_per_device": row["samples_per_s"] / row["devices"],
            "efficiency": row["samples_per_s"] / row["devices"] / base,
        }
        for row in rows
    ]


def data_parallel_report(family: str, *, device_counts, per_device_batch: int,
                         launcher: str = "shard_map", steps: int = 10, repeats: int = 5) -> dict:  # fmt: skip
    """Weak scaling over `device_counts` at `per_device_batch` per device, and for
    each count the overhead of the parallel step against the plain jitted step on
    one device with the same global batch.

    Returns:
      `{"device": ..., "scaling": rows, "overhead": rows}`; an overhead row holds
      both timings and `overhead = parallel / single - 1`.
    """
    timing = dict(launcher=launcher, steps=steps, repeats=repeats)
    rows = [
        measure(family, devices=n, batch_size=n * per_device_batch, **timing) for n in device_counts
    ]
    overhead = []
    for row in rows:
        single = measure(family, devices=None, batch_size=row["batch_size"], **timing)
        overhead.append(
            {
                "devices": row["devices"],
                "batch_size": row["batch_size"],
                "parallel_seconds": row["seconds_per_step"],
                "single_seconds": single["seconds_per_step"],
                "overhead": row["seconds_per_step"] / single["seconds_per_step"] - 1,
                "loss_difference": abs(row["loss"] - single["loss"]),
            }
        )
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "family": family,
        "launcher": launcher,
        "per_device_batch": per_device_batch,
        "scaling": scaling(rows),
        "overhead": overhead,
    }


def markdown(report: dict) -> str:
    """The report as two markdown tables."""
    lines = [
        f"{report['family']}, {report['launcher']}, {report['per_device_batch']} per device, "
        f"on {report['device']}",
        "",
        "| devices | global batch | ms/step (min-max) | samples/s | per device | efficiency |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["scaling"]:
        lo, hi = (1e3 * s for s in r["spread"])
        lines.append(
            f"| {r['devices']} | {r['batch_size']} | {1e3 * r['seconds_per_step']:.2f} "
            f"({lo:.2f}-{hi:.2f}) | {r['samples_per_s']:.0f} | "
            f"{r['samples_per_s_per_device']:.0f} | {r['efficiency']:.2f} |"
        )
    lines += [
        "",
        "| devices | global batch | parallel ms/step | one device ms/step | overhead |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["overhead"]:
        lines.append(
            f"| {r['devices']} | {r['batch_size']} | {1e3 * r['parallel_seconds']:.2f} | "
            f"{1e3 * r['single_seconds']:.2f} | {100 * r['overhead']:+.0f}% |"
        )
    return "\n".join(lines)
