"""Benchmark: K models trained as one vmapped sweep vs K sequential `fml.fit` calls.

Same total work on MNIST-1D (4000 train, 1000 test): K = 16 MLPs (40-256-256-10,
4 seeds x 4 learning rates) and K = 16 linear SVMs (one seed, 16 values of C), each
for the same epochs and batch size, per-step (host loop) and fused (one XLA program
per epoch). Wall time includes compilation, as a user pays it; compile counts come
from JAX's own compile log. Reports medians and the spread (min-max) of repeats.

Usage: python benchmarks/bench_sweep.py [--epochs 5] [--repeats 3] [--out runs/bench_sweep]
"""

import argparse
import collections
import json
import logging
import pathlib
import re
import statistics
import time

import jax
import numpy as np

import fml
from fml.models import presets
from fml.sweep import grid


class CompileCounter(logging.Handler):
    """Counts XLA compilations by function name from `jax.log_compiles` records."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def emit(self, record):
        match = re.search(r"Compiling jit\((\w+)\)", record.getMessage())
        if match:
            self.counts[match.group(1)] += 1


def _counted(run):
    counter = CompileCounter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    started = time.perf_counter()
    try:
        with jax.log_compiles(True):
            value = run()
    finally:
        logger.removeHandler(counter)
    return (
        time.perf_counter() - started,
        counter.counts["train_step"] + counter.counts["epoch"],
        value,
    )


def _sequential(model_for, data, configs, **kwargs):
    accuracies, params = [], []
    for config in configs:
        model = model_for(config)
        state, history = fml.fit(
            model,
            data,
            seed=config["seed"],
            learning_rate=config["learning_rate"],
            quiet=True,
            **kwargs,
        )
        accuracies.append(history["test"]["accuracy"])
        params.append(jax.device_get(state.params))
    return accuracies, params


def _case(name, model, data, axes, repeats, **kwargs):
    configs = grid(
        seed=axes.get("seeds", [0]),
        learning_rate=axes["learning_rate"],
        **({"C": axes["C"]} if "C" in axes else {}),
    )

    def model_for(config):
        if "C" in config:
            return fml.models.from_spec({**model.spec, "C": config["C"]})
        return model

    sweep_axes = {
        "seeds": axes.get("seeds", [0]),
        **{k: v for k, v in axes.items() if k != "seeds"},
    }
    rows = []
    for fused in (False, True):
        times = {"sweep": [], "sequential": []}
        compiles = {}
        for _ in range(repeats):
            seconds, count, result = _counted(
                lambda: fml.sweep(model, data, fused=fused, **sweep_axes, **kwargs)  # noqa: B023
            )
            times["sweep"].append(seconds)
            compiles["sweep"] = (count, result.compiles)
            seconds, count, (accuracies, params) = _counted(
                lambda: _sequential(model_for, data, configs, fused=fused, **kwargs)  # noqa: B023
            )
            times["sequential"].append(seconds)
            compiles["sequential"] = (count, None)
        sweep_acc = np.array([row["test_accuracy"] for row in result.table])
        param_gap = max(
            float(np.max(np.abs(a - b)))
            for k, alone in enumerate(params)
            for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(result.member_state(k).params))
        )
        rows.append(
            {
                "case": name,
                "K": len(configs),
                "mode": "fused" if fused else "per-step",
                "sweep_s": times["sweep"],
                "sequential_s": times["sequential"],
                "speedup": statistics.median(times["sequential"])
                / statistics.median(times["sweep"]),
                "sweep_compiles_log": compiles["sweep"][0],
                "sweep_compiles_cache": compiles["sweep"][1],
                "sequential_compiles_log": compiles["sequential"][0],
                "max_test_accuracy_gap": float(np.max(np.abs(sweep_acc - np.array(accuracies)))),
                "max_param_gap": param_gap,
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


def _spread(values):
    return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"


def _line(row):
    return (
        f"| {row['case']} | {row['K']} | {row['mode']} | {_spread(row['sequential_s'])} | "
        f"{_spread(row['sweep_s'])} | {row['speedup']:.1f}x | {row['sweep_compiles_log']} "
        f"({row['sweep_compiles_cache']}) | {row['sequential_compiles_log']} | "
        f"{row['max_test_accuracy_gap']:.4f} | {row['max_param_gap']:.1e} |"
    )


HEADER = (
    "| case | K | mode | 16 sequential fit | one sweep | speed-up | sweep compiles (cache) "
    "| sequential compiles | max test-acc gap | max param gap |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_sweep")
    args = parser.parse_args()
    data = fml.data.load("mnist1d")
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "repeats": args.repeats}
    device = jax.devices()[0]
    print(
        f"bench_sweep on {device.platform.upper()}, {args.epochs} epochs, batch {args.batch_size}"
    )
    print(HEADER)
    rows = _case(
        "MLP 40-256-256-10",
        presets.mnist1d_mlp(),
        data,
        {"seeds": [0, 1, 2, 3], "learning_rate": [3e-4, 1e-3, 3e-3, 1e-2]},
        **common,
    )
    rows += _case(
        "linear SVM",
        fml.models.svm(10),
        data,
        {"learning_rate": [1e-2], "C": list(np.logspace(-3, 2, 16))},
        **common,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "bench_sweep.md").write_text(HEADER + "\n" + "\n".join(map(_line, rows)) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
