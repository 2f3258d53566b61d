"""Markdown tables of experiment results, and the command line of a table experiment."""

import argparse
import math
import pathlib

import numpy as np

from fml import experiment, rundir


def mean_std(values) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std())


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 4 decimals."""

    def cell(value):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_table(table: str, out, *, device: str | None = None) -> pathlib.Path:
    """Writes `table` (with the device line above it) to `out/table.md`; returns the path."""
    text = f"Device: {device or experiment.device_description()}\n\n{table}\n"
    path = pathlib.Path(out) / "table.md"
    rundir.atomic_write(path, text.encode())
    return path


def script_main(doc: str, default_out: str, make_table, argv=None) -> None:
    """The command line of a table experiment: `--out DIR --scale S`, then
    `make_table(out, scale=S)` (which prints the table) and where it was written."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every epoch budget")
    args = parser.parse_args(argv)
    _, path = make_table(args.out, scale=args.scale)
    print(f"\ntable written to {path}; run directories under {args.out}/")
