"""Benchmarks of fml against pure JAX, Flax, PyTorch, Keras and scikit-learn.

`run()` measures, in one process (Keras in a child process):
- train-step throughput of the same models, batches, float32 and Adam in every
  framework, with the machine's float32 matmul peak and each model's GFLOP/s;
- convex fits against scikit-learn at equal test accuracy;
- seconds to the MNIST-1D paper's accuracy per family;
- peak memory of a training run against PyTorch and hand-written JAX;
- the LSTM's recurrent matmul alone, XLA:CPU against PyTorch.
`benchmarks/bench.py` calls `main`.
"""

import argparse
import json
import pathlib
import time

import jax

from benchmarks import _convex, _memory, _mnist1d, _recurrent, _throughput
from benchmarks._harness import Timing
from benchmarks._workloads import WORKLOADS
from fml.errors import ConfigError, unknown

FML = ("fml per-step", "fml fused epoch")
SECTIONS = ("throughput", "convex", "mnist1d", "memory", "recurrent")
GOALS = (  # (workload, peer, minimum ratio of fml's best to the peer)
    ("mlp", "pure JAX fused epoch", 1.0),
    ("mlp", "PyTorch eager", 2.5),
    ("cnn", "Keras 3 (TF)", 1.0),
    ("lstm", "PyTorch eager", 1.0),
    ("logistic", "PyTorch eager", 1.0),
)


def fml_best(timings: list[Timing], workload: str) -> Timing:
    """fml's faster mode (per-step or fused epoch) on `workload`."""
    return max(
        (t for t in timings if t.workload == workload and t.framework in FML),
        key=lambda t: t.samples_per_s,
    )


def throughput_table(timings: list[Timing], peak_gflops: float) -> str:
    lines = [
        "| model | framework | samples/s | vs fml | spread | GFLOP/s | % of peak "
        "| first call s | compile s | setup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for t in timings:
        best = fml_best(timings, t.workload).samples_per_s
        gflops = t.samples_per_s * WORKLOADS[t.workload].train_flops / 1e9
        lines.append(
            f"| {t.workload} | {t.framework} | {t.samples_per_s:,.0f} | "
            f"{t.samples_per_s / best:.2f} | {t.spread:.0%} | {gflops:.1f} | "
            f"{gflops / peak_gflops:.0%} | {t.first_call_s:.2f} | {t.compile_s:.2f} | {t.note} |"
        )
    return "\n".join(lines)


def goal_lines(timings: list[Timing], peak_gflops: float, convex) -> list[str]:
    """Each goal of issue 8 with its measured ratio and MET / NOT MET."""
    lines = []
    measured = {t.workload for t in timings}
    for workload, peer, minimum in GOALS:
        if workload not in measured:
            continue
        best = fml_best(timings, workload)
        peer_t = [t for t in timings if t.workload == workload and t.framework == peer]
        if not peer_t:
            lines.append(f"- {workload} vs {peer}: peer not measured")
            continue
        ratio = best.samples_per_s / peer_t[0].samples_per_s
        verdict = "MET" if ratio >= minimum else "NOT MET"
        lines.append(
            f"- {workload}: {best.framework} / {peer} = {ratio:.2f}x "
            f"(goal >= {minimum}x): {verdict}"
        )
    if any(t.workload == "mlp" for t in timings):
        mlp = fml_best(timings, "mlp")
        share = mlp.samples_per_s * WORKLOADS["mlp"].train_flops / 1e9 / peak_gflops
        lines.append(
            f"- mlp: {share:.0%} of matmul peak (goal >= 60%): "
            f"{'MET' if share >= 0.6 else 'NOT MET'}"
        )
    for c in convex:
        ratio = c.sklearn_s / c.fml_s
        lines.append(
            f"- {c.problem} n={c.n:,}: sklearn / fml = {ratio:.1f}x (goal >= 4x): "
            f"{'MET' if ratio >= 4 else 'NOT MET'}"
        )
    first = [t for t in timings if t.framework == "fml per-step"]
    if first:
        worst = max(first, key=lambda t: t.compile_s)
        lines.append(
            f"- first-step compile: worst {worst.compile_s:.2f} s ({worst.workload}) "
            f"(goal < 1 s): {'MET' if worst.compile_s < 1 else 'NOT MET'}"
        )
    return lines


def convex_table(results) -> str:
    lines = [
        "| problem | n | fml s | fml first s | sklearn s | sklearn / fml | fml score "
        "| sklearn score | how |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in results:
        lines.append(
            f"| {c.problem} | {c.n:,} | {c.fml_s:.3f} | {c.fml_first_s:.2f} | {c.sklearn_s:.3f} "
            f"| {c.sklearn_s / c.fml_s:.1f}x | {c.metric} {c.fml_score:.4f} "
            f"| {c.sklearn_score:.4f} | {c.how} |"
        )
    return "\n".join(lines)


def accuracy_table(results) -> str:
    lines = [
        "| family | paper accuracy | reached | epochs | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.family} | {r.target:.2f} | {r.reached:.3f} | {r.epochs} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def run(
    *,
    quick: bool = False,
    workloads=tuple(WORKLOADS),
    frameworks=_throughput.FRAMEWORKS,
    repeats: int = 7,
    sections=SECTIONS,
    log=print,
) -> dict:
    """Runs the benchmark; returns its results and the markdown report.

    `quick` shrinks every workload to 2 batches, the convex fits to 10k
    examples and time-to-accuracy to one epoch (a smoke test, not figures).
    """
    started = time.perf_counter()
    device = jax.devices()[0]
    results = {"device": f"{device.platform} ({device.device_kind})", "quick": quick}
    peak = _throughput.matmul_peak_gflops(512 if quick else 2048)
    results["matmul_peak_gflops"] = peak
    timings, convex = [], []
    if "throughput" in sections:
        timings = _throughput.throughput(
            workloads, frameworks, repeats=repeats, quick=quick, log=log
        )
    if "convex" in sections:
        convex = _convex.convex_fits((10_000,) if quick else _convex.SIZES, log=log)
    parts = [
        f"Machine: {results['device']}, {_throughput.cpu_threads()} CPU threads; "
        f"float32 matmul peak {peak:.1f} GFLOP/s (jitted jnp.dot, median of 7).",
    ]
    if timings:
        parts += [
            f"\nTrain-step throughput: median of {repeats} interleaved repeats after "
            "warm-up; spread = (max - min) / median; GFLOP/s = 3 x forward FLOPs x samples/s; "
            "'vs fml' = samples/s / fml's faster mode.\n",
            throughput_table(timings, peak),
        ]
    if convex:
        parts += ["\nConvex fits (fml s: a second identical fit, compiled program reused):\n"]
        parts += [convex_table(convex)]
    if "mnist1d" in sections:
        tta = _mnist1d.all_families(quick, log=log)
        results["time_to_accuracy"] = [r._asdict() for r in tta]
        parts += ["\nTime to the MNIST-1D paper's test accuracy:\n", accuracy_table(tta)]
    if "memory" in sections:
        memory = _memory.peak_memory(log=log)
        results["peak_memory_mb"] = memory
        parts += [
            "\nPeak memory of the same MLP training run (/usr/bin/time -v, max RSS): "
            + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items())
        ]
    if "recurrent" in sections:
        gemm = _recurrent.recurrent_gemm(repeats=5 if quick else 50, log=log)
        results["recurrent_gemm_gflops"] = gemm
        parts += [
            f"\nThe LSTM's recurrent matmul alone ({_recurrent.STEPS} dependent "
            f"[{_recurrent.BATCH}, {_recurrent.LSTM_HIDDEN}] x [{_recurrent.LSTM_HIDDEN}, "
            f"{4 * _recurrent.LSTM_HIDDEN}] steps): "
            + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm.items())
        ]
    if timings or convex:
        parts += ["\nGoals:\n", "\n".join(goal_lines(timings, peak, convex))]
    parts.append(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")
    results["throughput"] = [t.to_json() for t in timings]
    results["convex"] = [c._asdict() for c in convex]
    results["markdown"] = "\n".join(parts)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes")
    parser.add_argument("--models", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument(
        "--frameworks", default=",".join(_throughput.FRAMEWORKS), help="comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (>= 5)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--out", default="runs/bench", help="directory for report.md, results.json")


def main(args: argparse.Namespace) -> dict:
    """Runs `run` from parsed arguments; prints and writes the report."""
    for given, known, what in [
        (args.models, WORKLOADS, "model"),
        (args.frameworks, _throughput.FRAMEWORKS, "framework"),
        (args.sections, SECTIONS, "section"),
    ]:
        for name in given.split(","):
            if name not in known:
                raise unknown(f"bench {what}", name, known)
    if args.repeats < 1:
        raise ConfigError(f"expected --repeats >= 1, got {args.repeats}")
    results = run(
        quick=args.quick,
        workloads=tuple(args.models.split(",")),
        frameworks=tuple(args.frameworks.split(",")),
        repeats=args.repeats,
        sections=tuple(args.sections.split(",")),
    )
    print(results["markdown"])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(results["markdown"] + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nreport written to {out / 'report.md'}")
    return results
