"""Random-access sources on disk: memory-mapped `.npy` arrays and directories of
Parquet part-files (as Spark or Hadoop write them).

A source has `len(source)`, `source.read(index_B) -> {"x", "y"}` and, for Grain,
`source[i]`. Sources pickle without their open files or caches, so Grain's worker
processes each reopen them lazily.
"""

import collections
import glob
import os

import numpy as np

from fml.errors import ConfigError, DataError, ShapeError, require

_DEFAULT_CACHE_BYTES = 256 << 20


class _Lazy:
    """Pickles without the attributes named in `_TRANSIENT` (open files, caches)."""

    _TRANSIENT: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.read(np.asarray([i])).items()}


# ------------------------------------------------------------------ .npy


def _open_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None


class NpySource(_Lazy):
    """Two `.npy` files (inputs `[N, ...]`, labels `[N]`) memory-mapped: `read`
    copies only the rows asked for, so memory stays one batch whatever `N`."""

    _TRANSIENT = ("_arrays",)

    def __init__(self, x_path: str, y_path: str):
        self.x_path, self.y_path = os.fspath(x_path), os.fspath(y_path)
        x, y = self._open()
        if x.shape[:1] != y.shape[:1]:
            raise ShapeError(
                f"expected {y_path} with {x.shape[0]} rows like {x_path}, got shape {y.shape}"
            )
        self.input_shape = tuple(x.shape[1:])

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if "_arrays" not in self.__dict__:
            self._arrays = _open_npy(self.x_path), _open_npy(self.y_path)
        return self._arrays

    def __len__(self) -> int:
        return self._open()[0].shape[0]

    def read(self, index_B: np.ndarray) -> dict:
        x, y = self._open()
        return {"x": np.asarray(x[index_B]), "y": np.asarray(y[index_B])}

    def __repr__(self) -> str:
        return f"NpySource({self.x_path!r}, {self.y_path!r}, {len(self)} examples)"


def npy_source(x_path: str, y_path: str) -> NpySource:
    """Memory-mapped `.npy` inputs and labels as a random-access source.

    Args:
      x_path: a `.npy` file of inputs `[N, ...]` (e.g. written by `np.save`).
      y_path: a `.npy` file of labels `[N]`.
    """
    return NpySource(x_path, y_path)


# ------------------------------------------------------------------ Parquet


def _pa():
    return require("pyarrow", "data")


def _pq():
    return require("pyarrow.parquet", "data")


def _is_data_file(path: str, root: str) -> bool:
    """Parquet part-files, not Spark's `_SUCCESS`, `_committed_*` or `.crc` files."""
    parts = os.path.relpath(path, root).split(os.sep)
    return path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


def parquet_files(path_or_glob: str) -> list[str]:
    """The Parquet files of a file, a directory (searched recursively, `key=value/`
    partition directories included) or a glob pattern, sorted by path."""
    path = os.fspath(path_or_glob)
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "**", "*"), recursive=True)
        files = [f for f in found if os.path.isfile(f) and _is_data_file(f, path)]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"no Parquet files (*.parquet) found at {path!r}")
    return sorted(files)


def _kind(arrow_type) -> str | None:
    """ "int", "float" or "bool" for a numeric Arrow type, else None."""
    pa = _pa()
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    return None


def _is_list_of_numbers(arrow_type) -> bool:
    pa = _pa()
    listy = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    listy = listy or pa.types.is_fixed_size_list(arrow_type)
    return listy and _kind(arrow_type.value_type) is not None


def _check_schema(file: str, schema, features: list[str], label: str, vector: bool) -> None:
    """`DataError` naming the column, the expected and the found type, if any is off."""
    names = schema.names
    for column in [*features, label]:
        if column not in names:
            raise DataError(
                f"{file}: no column {column!r}; expected it among the file's columns {names}"
            )
    for column in features:
        found = schema.field(column).type
        ok = _is_list_of_numbers(found) or _kind(found) is not None if vector else _kind(found)
        if not ok:
            expected = "a number or a list of numbers" if vector else "a number"
            raise DataError(
                f"{file}: feature column {column!r} has type {found}; expected {expected} "
                "(int, float or bool)"
            )
    found = schema.field(label).type
    if _kind(found) not in ("int", "float"):
        raise DataError(
            f"{file}: label column {label!r} has type {found}; expected an int (class) "
            "or a float (regression target)"
        )


def _column_numpy(column, name: str, where: str) -> np.ndarray:
    """One Arrow column as numpy: numbers `[R]`, lists of numbers `[R, width]`."""
    pa = _pa()
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise DataError(f"{where}: column {name!r} has {column.null_count} null values")
    if _kind(column.type) is not None:
        return column.to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if len(column) == 0:
        return values.reshape(0, 0)
    widths = np.diff(column.offsets.to_numpy()) if hasattr(column, "offsets") else None
    width = len(values) // len(column)
    if widths is not None and not np.all(widths == width):
        raise DataError(
            f"{where}: list column {name!r} has rows of lengths {sorted(set(widths.tolist()))}; "
            "expected one length for every row"
        )
    return values.reshape(len(column), width)


class ParquetSource(_Lazy):
    """Rows of Parquet part-files as a random-access source, read lazily.

    Row `i` of the source is row `i` of the files concatenated in path order. A
    read finds each row's (file, row group) from the row-group sizes in the files'
    footers, reads whole row groups (only the needed columns) and keeps them in a
    least-recently-used cache of at most `cache_bytes` decoded bytes, so memory per
    process (each Grain worker has its own cache) is about `cache_bytes` plus one
    batch. Under a global shuffle a batch touches rows from many row groups:
    reads are fast while the cache holds every row group, and re-decode a row
    group on each miss otherwise (use small row groups for data much larger than
    the cache).
    """

    _TRANSIENT = ("_files", "_cache", "_cached_bytes")

    def __init__(
        self,
        path_or_glob: str,
        *,
        features: list[str] | str,
        label: str,
        shape: tuple[int, ...] | None = None,
        cache_bytes: int = _DEFAULT_CACHE_BYTES,
    ):
        pq = _pq()
        self.vector = isinstance(features, str)
        self.features = [features] if self.vector else list(features)
        if not self.features or not all(isinstance(f, str) for f in self.features):
            raise ConfigError(
                f"expected features as a column name or a list of them, got {features!r}"
            )
        if not isinstance(label, str):
            raise ConfigError(f"expected label as a column name, got {label!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ConfigError(f"expected cache_bytes to be an int >= 0, got {cache_bytes!r}")
        self.label, self.cache_bytes = label, cache_bytes
        self.paths = parquet_files(path_or_glob)
        groups = []
        for file_index, path in enumerate(self.paths):
            try:
                metadata = pq.ParquetFile(path).metadata
                schema = metadata.schema.to_arrow_schema()
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for bad footers
                raise DataError(
                    f"{path}: not a readable Parquet file ({type(e).__name__}: {e})"
                ) from None
            _check_schema(path, schema, self.features, label, self.vector)
            groups += [
                (file_index, g, metadata.row_group(g).num_rows)
                for g in range(metadata.num_row_groups)
            ]
        groups = [g for g in groups if g[2] > 0]
        if not groups:
            raise DataError(f"the Parquet files at {path_or_glob!r} have no rows")
        self.groups = [(f, g) for f, g, _ in groups]
        self.starts = np.cumsum([0] + [rows for _, _, rows in groups])
        first = self._group(0)["x"]
        natural = first.shape[1:]
        self.input_shape = natural if shape is None else tuple(shape)
        if int(np.prod(self.input_shape)) != int(np.prod(natural)):
            raise ShapeError(
                f"expected a shape of {int(np.prod(natural))} values per row like the "
                f"features {natural}, got shape {tuple(shape)}"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, file_index: int):
        files = self.__dict__.setdefault("_files", {})
        if file_index not in files:
            files[file_index] = _pq().ParquetFile(self.paths[file_index])
        return files[file_index]

    def _decode(self, group: int) -> dict:
        file_index, row_group = self.groups[group]
        path = self.paths[file_index]
        where = f"{path} row group {row_group}"
        try:
            table = self._file(file_index).read_row_group(
                row_group, columns=[*self.features, self.label]
            )
        except Exception as e:  # corrupt pages: OSError, ArrowInvalid, ...
            raise DataError(f"{where}: corrupt Parquet data ({type(e).__name__}: {e})") from None
        _check_schema(path, table.schema, self.features, self.label, self.vector)
        columns = [_column_numpy(table.column(c), c, where) for c in self.features]
        x = columns[0] if self.vector else np.stack(columns, axis=1)
        x = x.astype(np.float32).reshape(len(x), -1) if x.ndim == 1 else x.astype(np.float32)
        y = _column_numpy(table.column(self.label), self.label, where)
        y = y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) else np.float32)
        return {"x": x, "y": y}

    def _group(self, group: int) -> dict:
        cache = self.__dict__.setdefault("_cache", collections.OrderedDict())
        if group in cache:
            cache.move_to_end(group)
            return cache[group]
        arrays = self._decode(group)
        size = sum(a.nbytes for a in arrays.values())
        self._cached_bytes = self.__dict__.get("_cached_bytes", 0) + size
        cache[group] = arrays
        while len(cache) > 1 and self._cached_bytes > self.cache_bytes:
            _, dropped = cache.popitem(last=False)
            self._cached_bytes -= sum(a.nbytes for a in dropped.values())
        return arrays

    def read(self, index_B: np.ndarray) -> dict:
        index_B = np.asarray(index_B, np.int64)
        if index_B.size and (index_B.min() < 0 or index_B.max() >= len(self)):
            raise ShapeError(f"expected row indices in [0, {len(self)}), got {index_B}")
        group_B = np.searchsorted(self.starts, index_B, side="right") - 1
        x = y = None
        for group in np.unique(group_B):
            arrays = self._group(int(group))
            where = group_B == group
            rows = index_B[where] - self.starts[group]
            if x is None:
                x = np.empty((len(index_B), *arrays["x"].shape[1:]), np.float32)
                y = np.empty(len(index_B), arrays["y"].dtype)
            x[where], y[where] = arrays["x"][rows], arrays["y"][rows]
        if x is None:  # no rows asked for
            arrays = self._group(0)
            x, y = arrays["x"][:0], arrays["y"][:0]
        return {"x": x.reshape(len(index_B), *self.input_shape), "y": y}

    def __repr__(self) -> str:
        return (
            f"ParquetSource({len(self.paths)} files, {len(self)} rows, features="
            f"{self.features[0] if self.vector else self.features}, label={self.label!r})"
        )


def parquet_source(
    path_or_glob: str,
    *,
    features: list[str] | str,
    label: str,
    shape: tuple[int, ...] | None = None,
    cache_bytes: int = _DEFAULT_CACHE_BYTES,
) -> ParquetSource:
    """Parquet part-files as a random-access source for `fml.data.stream`.

    Reads the output directory of a Spark or Hadoop job as it is: every
    `*.parquet` file below `path_or_glob` (recursively, through `key=value/`
    partition directories; `_SUCCESS`, `_*` and `.*` files skipped), in path order.
    Only the footers are read here; rows are read lazily by row group.

    Args:
      path_or_glob: a directory, a file, or a glob pattern ("out/part-*.parquet").
      features: a list of numeric columns (each example is their values, float32
        `[len(features)]`), or one column of lists of numbers (Spark's
        `array<float>`; float32 `[width]`).
      label: an int column (class labels, int32) or a float one (targets, float32).
      shape: reshape each example's features, e.g. `(28, 28, 1)` for images stored
        as 784 values.
      cache_bytes: decoded row groups kept per process (each worker has its own).

    Raises:
      DataError: no Parquet files; a file that is not Parquet (naming it); a
        missing column or one of the wrong type (naming the column, the expected
        and the found type). Corrupt row groups raise `DataError` naming the file
        and the row group when they are read.
    """
    return ParquetSource(
        path_or_glob, features=features, label=label, shape=shape, cache_bytes=cache_bytes
    )
