"""The files `fml predict` reads (raw inputs, .npy or .csv) and writes (.csv)."""

import csv
import io
import math
import pathlib

import numpy as np

from fml.errors import DataError, ShapeError
from fml.rundir import atomic_write


def _read_csv(path: pathlib.Path) -> np.ndarray:
    """A numeric CSV as float64 `[rows, columns]`; a first row that is not numbers is
    a header and skipped."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows = [r for r in rows if r and any(c.strip() for c in r)]

    def numbers(row, line):
        try:
            return [float(c) for c in row]
        except ValueError as e:
            raise DataError(f"{path} line {line}: expected numbers, got {row[:5]}: {e}") from None

    if rows:
        try:
            [float(c) for c in rows[0]]
        except ValueError:
            rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"{path}: expected at least one row of numbers, got none")
    values = [numbers(r, i + 1) for i, r in enumerate(rows)]
    widths = {len(v) for v in values}
    if len(widths) != 1:
        raise ShapeError(f"{path}: expected every row to have the same width, got {sorted(widths)}")
    return np.asarray(values, np.float64)


def read_inputs(path, raw_shape) -> np.ndarray:
    """Raw inputs `[N, *raw_shape]` from a `.npy` (that shape, or flat rows) or a
    `.csv` (one flat example per row).

    Raises:
      DataError: no such file, an unreadable one, or another suffix.
      ShapeError: rows of the wrong width, naming the expected one.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"no input file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path} is not a readable .npy array: {e}") from None
    elif suffix == ".csv":
        x = _read_csv(path)
    else:
        raise DataError(f"expected an input file ending in .npy or .csv, got {path.name!r}")
    raw_shape = tuple(raw_shape)
    if x.ndim == 2 and len(raw_shape) > 1 and x.shape[1] == math.prod(raw_shape):
        x = x.reshape((-1, *raw_shape))  # flat rows of a multi-dimensional example
    if x.ndim < 1 or x.shape[1:] != raw_shape:
        flat = f" (or flat rows of {math.prod(raw_shape)})" if len(raw_shape) > 1 else ""
        raise ShapeError(
            f"{path}: expected inputs of shape (N, {', '.join(map(str, raw_shape))}){flat}, "
            f"got {x.shape}"
        )
    return x


def prediction_rows(predictions, classes) -> tuple[list[str], list[list]]:
    """CSV header and rows of labels (with class names) or regression values."""
    predictions = np.asarray(predictions)
    if np.issubdtype(predictions.dtype, np.integer):
        if classes:
            return ["label", "class"], [[int(p), classes[int(p)]] for p in predictions]
        return ["label"], [[int(p)] for p in predictions]
    values = predictions.reshape(len(predictions), -1)
    header = ["value"] if values.shape[1] == 1 else [f"value_{i}" for i in range(values.shape[1])]
    return header, [[repr(float(v)) for v in row] for row in values]


def probability_rows(probabilities, classes) -> tuple[list[str], list[list]]:
    """CSV header (one `p_CLASS` column per class) and rows of probabilities."""
    names = classes or [str(i) for i in range(probabilities.shape[1])]
    return [f"p_{c}" for c in names], [[f"{p:.7g}" for p in row] for row in probabilities]


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_text(path, text: str) -> None:
    atomic_write(path, text.encode())
