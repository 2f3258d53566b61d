"""The MNIST-1D table (`experiments/mnist1d_table.py`). Every family trained with its recipe
(`fml.models.presets.recipe`) over several seeds on MNIST-1D and on its
shuffled-sequence variant, next to the figures of the MNIST-1D paper.

Each run writes its own run directory (with `curves.png`); the table goes to
`OUT/table.md`. The CNN rows carry a PyTorch reference measured in the same run:
the paper's own `ConvBase` in plain PyTorch (`experiments/torch_reference.py`) with its
notebook's protocol (Adam 1e-2, batch 100, 8,000 steps over the data in order,
PyTorch's default init), on the same arrays and seeds.
"""

import concurrent.futures
import multiprocessing
import pathlib
from typing import NamedTuple

from experiments import tables, torch_reference
from fml import data as data_lib
from fml import experiment

# Test accuracy reported in Greydanus & Kobak, "Scaling down deep learning with MNIST-1D".
MNIST1D_PAPER = {"logistic_regression": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91}
MNIST1D_SHUFFLED_PAPER = {"cnn": 0.56, "gru": 0.57}
# Our stretch goals, above the paper.
STRETCH = {"cnn": 0.95, "gru": 0.93}
# The MNIST-1D notebook's protocol for the paper's ConvBase, the PyTorch reference.
CONV_BASE_PROTOCOL = {"learning_rate": 1e-2, "batch_size": 100, "steps": 8000, "shuffle": False}
# Rows with a PyTorch reference (by label).
PYTORCH_REFERENCES = {"cnn": torch_reference.conv_base}


class Entry(NamedTuple):
    """One model of the table: its label, fml family and RNN cell."""

    label: str
    family: str
    cell: str | None = None


ENTRIES = (
    Entry("logistic_regression", "logistic_regression"),
    Entry("mlp", "mlp"),
    Entry("cnn", "cnn"),
    Entry("gru", "rnn", "gru"),
    Entry("lstm", "rnn", "lstm"),
    Entry("svm", "svm"),
)
# The shuffled-sequence rows the paper reports.
SHUFFLED_ENTRIES = (Entry("cnn", "cnn"), Entry("gru", "rnn", "gru"))


class TableRow(NamedTuple):
    label: str
    dataset: str
    accuracies: list[float]
    seconds: list[float]
    paper: float | None
    stretch: float | None
    run_dirs: list[pathlib.Path]
    pytorch: list[float] | None = None  # the PyTorch reference's accuracy per seed


class Job(NamedTuple):
    """One training run of the table."""

    entry: Entry
    dataset: str
    seed: int
    scale: float
    out: str
    resume: bool = False


def _pytorch_reference(job: Job) -> float | None:
    """The PyTorch reference's test accuracy for `job`'s entry, data set and seed
    (its steps times `job.scale`), or None where the entry has none."""
    build = PYTORCH_REFERENCES.get(job.entry.label)
    if build is None:
        return None
    protocol = dict(CONV_BASE_PROTOCOL)
    protocol["steps"] = max(1, round(protocol["steps"] * job.scale))
    torch_reference.seeded(job.seed)
    return torch_reference.train(build(), data_lib.load(job.dataset), seed=job.seed, **protocol)


def _run_job(job: Job) -> tuple[float, float, pathlib.Path, float | None]:
    """Trains one (entry, data set, seed), or with `resume` keeps a finished run of
    the same config, and its PyTorch reference if it has one; returns (test
    accuracy, seconds, run dir, PyTorch test accuracy or None)."""
    config = experiment.make_config(
        job.entry.family, job.dataset, cell=job.entry.cell, seed=job.seed, validation=0.0
    )
    config["epochs"] = max(1, round(config["epochs"] * job.scale))
    run_dir = pathlib.Path(job.out) / job.dataset / job.entry.label / f"seed_{job.seed}"
    kept = experiment.finished_run(config, run_dir) if job.resume else None
    if kept is None:
        result = experiment.train_and_evaluate(config, run_dir, quiet=True, overwrite=True)
        test, seconds = result.test, result.seconds
    else:
        test, seconds = kept
    print(
        f"  {job.dataset} {job.entry.label} seed {job.seed}: test accuracy "
        f"{test['accuracy']:.4f} ({seconds:.1f} s{', kept' if kept else ''})",
        flush=True,
    )
    reference = _pytorch_reference(job)
    if reference is not None:
        print(
            f"  {job.dataset} {job.entry.label} seed {job.seed}: PyTorch {reference:.4f}",
            flush=True,
        )
    return test["accuracy"], seconds, run_dir, reference


def _run_jobs(jobs: list[Job], workers: int) -> list[tuple]:
    """Runs the jobs in order, or in `workers` fresh processes (spawned: JAX does not
    survive a fork)."""
    if workers <= 1:
        return [_run_job(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_run_job, jobs))


def table_rows(
    out,
    entries=ENTRIES,
    *,
    datasets=("mnist1d",),
    seeds=(0, 1, 2),
    scale: float = 1.0,
    workers: int = 1,
    resume: bool = False,
) -> list[TableRow]:
    """Trains every entry for every seed on every data set; one row per (data set, entry).

    The recipes' data protocol is the paper's: all 4000 training examples (no
    validation split), test accuracy on the 1000 test examples after the last epoch.

    Args:
      out: run directories go to `out/DATASET/LABEL/seed_N`.
      entries: the models (`ENTRIES`, `SHUFFLED_ENTRIES` or a subset), or a dict
        `{dataset: entries}` to give each data set its own.
      datasets: "mnist1d" and/or "mnist1d_shuffled" (ignored when `entries` is a dict).
      seeds: training seeds.
      scale: multiplies every recipe's epochs (smoke tests use a small one).
      workers: processes training at once (each run is single-program; on a
        multi-core CPU two or more workers finish the table sooner).
      resume: keep runs already in `out` that were made from the same config.
    """
    plan = entries if isinstance(entries, dict) else {d: entries for d in datasets}
    groups = [(d, e) for d, group in plan.items() for e in group]
    jobs = [Job(e, d, seed, scale, str(out), resume) for d, e in groups for seed in seeds]
    results = iter(_run_jobs(jobs, workers))
    rows = []
    for dataset, entry in groups:
        done = [next(results) for _ in seeds]
        paper = MNIST1D_PAPER if dataset == "mnist1d" else MNIST1D_SHUFFLED_PAPER
        rows.append(
            TableRow(
                entry.label,
                dataset,
                [accuracy for accuracy, *_ in done],
                [seconds for _, seconds, *_ in done],
                paper.get(entry.label),
                STRETCH.get(entry.label) if dataset == "mnist1d" else None,
                [run_dir for _, _, run_dir, _ in done],
                None if done[0][3] is None else [reference for *_, reference in done],
            )
        )
    return rows


def _goal(row: TableRow) -> str:
    if row.paper is None:
        return "no paper figure"
    mean, _ = tables.mean_std(row.accuracies)
    if mean < row.paper:
        return f"**below paper by {100 * (row.paper - mean):.1f} pts**"
    if row.pytorch is not None:
        reference, _ = tables.mean_std(row.pytorch)
        if mean < reference:
            return f"paper met; **below PyTorch by {100 * (reference - mean):.1f} pts**"
    if row.stretch is not None:
        if mean >= row.stretch:
            return "paper and stretch met"
        return f"paper met; stretch short by {100 * (row.stretch - mean):.1f} pts"
    return "paper met"


def markdown(rows: list[TableRow]) -> str:
    """The table: accuracy as mean ± std over seeds, in percent, and mean train seconds."""
    seeds = len(rows[0].accuracies) if rows else 0
    header = [
        "model",
        "data set",
        f"test accuracy % (mean ± std, {seeds} seeds)",
        "paper %",
        "PyTorch ConvBase % (same run)",
        "goal",
        "train s per seed",
    ]
    body = []
    for row in rows:
        mean, std = tables.mean_std(row.accuracies)
        seconds, _ = tables.mean_std(row.seconds)
        paper = f"{100 * row.paper:.0f}" if row.paper is not None else "–"
        pytorch = "–"
        if row.pytorch is not None:
            reference, spread = tables.mean_std(row.pytorch)
            pytorch = f"{100 * reference:.1f} ± {100 * spread:.1f}"
        body.append(
            [
                row.label,
                row.dataset,
                f"{100 * mean:.1f} ± {100 * std:.1f}",
                paper,
                pytorch,
                _goal(row),
                f"{seconds:.1f}",
            ]
        )
    return tables.markdown_table(header, body)


def mnist1d_table(
    out,
    *,
    seeds=(0, 1, 2),
    scale: float = 1.0,
    shuffled: bool = True,
    workers: int = 1,
    resume: bool = False,
):
    """The MNIST-1D table (and its shuffled-sequence rows); prints it and writes
    `out/table.md`. Returns `(rows, table_path)`."""
    device = experiment.device_description()
    print(f"MNIST-1D table on {device}, {len(seeds)} seed(s), {workers} worker(s)", flush=True)
    plan = {"mnist1d": ENTRIES}
    if shuffled:
        plan["mnist1d_shuffled"] = SHUFFLED_ENTRIES
    rows = table_rows(out, plan, seeds=seeds, scale=scale, workers=workers, resume=resume)
    table = markdown(rows)
    print(table)
    path = tables.save_table(table, out, device=device)
    return rows, path
