"""The main job: the MNIST-1D table. Every family trained with its recipe
(`fml.models.presets.recipe`) over several seeds on MNIST-1D and on its
shuffled-sequence variant, next to the figures of the MNIST-1D paper.

Each run writes its own run directory (with `curves.png`); the table goes to
`OUT/table.md`.
"""

import pathlib
from typing import NamedTuple

from fml import experiment

# Test accuracy reported in Greydanus & Kobak, "Scaling down deep learning with MNIST-1D".
MNIST1D_PAPER = {"logistic_regression": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91}
MNIST1D_SHUFFLED_PAPER = {"cnn": 0.56, "gru": 0.57}
# Our stretch goals, above the paper.
STRETCH = {"cnn": 0.95, "gru": 0.93}


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


def _epochs(config: dict, scale: float) -> int:
    return max(1, round(config["epochs"] * scale))


def table_rows(
    out,
    entries=ENTRIES,
    *,
    dataset: str = "mnist1d",
    seeds=(0, 1, 2),
    scale: float = 1.0,
    log=print,
) -> list[TableRow]:
    """Trains every entry for every seed on `dataset`; one row per entry.

    The recipes' data protocol is the paper's: all 4000 training examples (no
    validation split), test accuracy on the 1000 test examples after the last epoch.

    Args:
      out: run directories go to `out/DATASET/LABEL/seed_N`.
      entries: the models (`ENTRIES`, `SHUFFLED_ENTRIES` or a subset).
      dataset: "mnist1d" or "mnist1d_shuffled".
      seeds: training seeds.
      scale: multiplies every recipe's epochs (smoke tests use a small one).
      log: progress lines.
    """
    paper = MNIST1D_PAPER if dataset == "mnist1d" else MNIST1D_SHUFFLED_PAPER
    rows = []
    for entry in entries:
        results = []
        for seed in seeds:
            config = experiment.make_config(
                entry.family, dataset, cell=entry.cell, seed=seed, validation=0.0
            )
            config["epochs"] = _epochs(config, scale)
            run_dir = pathlib.Path(out) / dataset / entry.label / f"seed_{seed}"
            results.append(experiment.train_and_evaluate(config, run_dir, log=log))
            log(
                f"  {dataset} {entry.label} seed {seed}: test accuracy "
                f"{results[-1].test['accuracy']:.4f} ({results[-1].seconds:.1f} s)"
            )
        rows.append(
            TableRow(
                entry.label,
                dataset,
                [r.test["accuracy"] for r in results],
                [r.seconds for r in results],
                paper.get(entry.label),
                STRETCH.get(entry.label) if dataset == "mnist1d" else None,
                [r.run_dir for r in results],
            )
        )
    return rows


def _goal(row: TableRow) -> str:
    if row.paper is None:
        return "no paper figure"
    mean, _ = experiment.mean_std(row.accuracies)
    if mean < row.paper:
        return f"**below paper by {100 * (row.paper - mean):.1f} pts**"
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
        "goal",
        "train s per seed",
    ]
    body = []
    for row in rows:
        mean, std = experiment.mean_std(row.accuracies)
        seconds, _ = experiment.mean_std(row.seconds)
        paper = f"{100 * row.paper:.0f}" if row.paper is not None else "–"
        body.append(
            [
                row.label,
                row.dataset,
                f"{100 * mean:.1f} ± {100 * std:.1f}",
                paper,
                _goal(row),
                f"{seconds:.1f}",
            ]
        )
    return experiment.markdown_table(header, body)


def mnist1d_table(out, *, seeds=(0, 1, 2), scale: float = 1.0, shuffled: bool = True, log=print):
    """The MNIST-1D table (and its shuffled-sequence rows); prints it and writes
    `out/table.md`. Returns `(rows, table_path)`."""
    device = experiment.device_description()
    log(f"MNIST-1D table on {device}")
    rows = table_rows(out, ENTRIES, seeds=seeds, scale=scale, log=log)
    if shuffled:
        rows += table_rows(
            out, SHUFFLED_ENTRIES, dataset="mnist1d_shuffled", seeds=seeds, scale=scale, log=log
        )
    table = markdown(rows)
    log(table)
    path = experiment.save_table(table, out, device=device)
    return rows, path


def main_job(out: str = "runs/main", quick: bool = False) -> list[TableRow]:
    """The README's main command: the MNIST-1D table over 3 seeds (`quick`: one seed,
    a tenth of the epochs, for smoke tests); says where the table and plots went."""
    seeds = (0,) if quick else (0, 1, 2)
    rows, path = mnist1d_table(out, seeds=seeds, scale=0.1 if quick else 1.0)
    print(f"\ntable written to {path}")
    print(f"learning curves: {pathlib.Path(out)}/<data set>/<model>/seed_<n>/curves.png")
    return rows
