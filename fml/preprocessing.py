"""What fml does to raw inputs before a model sees them, as data.

A preprocessing block is a small JSON-able dict, saved with every run
(`RUN_DIR/preprocessing.json`), applied by `fml.load(run).predict` and carried by
every export:

  {
    "format": "fml.preprocessing/1",
    "raw_shape": [30],             # one raw example, as the data set's source gives it
    "input_shape": [30],           # one example as the model takes it
    "steps": [                     # applied in order to float32 inputs [N, *raw_shape]
      {"op": "reshape", "shape": [8, 8, 1]},      # x.reshape(N, *shape)
      {"op": "scale", "factor": 0.0625},          # x * factor
      {"op": "standardize", "mean": [...], "std": [...]},   # (x - mean) / std
    ],
    "classes": ["malignant", "benign"]   # class names by label index, or null
  }

Every constant is a float32 value, and every step is float32 arithmetic, so numpy,
JAX, PyTorch and TensorFlow compute the same inputs from the same raw rows.

Example:
  >>> import numpy as np
  >>> from fml import preprocessing
  >>> block = preprocessing.block((2,), [preprocessing.standardize([1.0, 2.0], [2.0, 4.0])])
  >>> preprocessing.apply(block, np.array([[3.0, 6.0]]))
  array([[1., 1.]], dtype=float32)
"""

import math

import numpy as np

from fml.errors import ConfigError, ShapeError

FORMAT = "fml.preprocessing/1"
OPS = ("reshape", "scale", "standardize")


def reshape(shape) -> dict:
    """The step `x.reshape(N, *shape)`."""
    return {"op": "reshape", "shape": [int(d) for d in shape]}


def scale(factor: float) -> dict:
    """The step `x * factor` (float32)."""
    return {"op": "scale", "factor": float(np.float32(factor))}


def standardize(mean, std) -> dict:
    """The step `(x - mean) / std`, per feature (float32)."""
    as_list = lambda a: np.asarray(a, np.float32).tolist()
    return {"op": "standardize", "mean": as_list(mean), "std": as_list(std)}


def fit_standardize(x_train) -> dict:
    """The standardize step fitted on `x_train` `[N, ...]` (float64 statistics rounded
    to float32; a constant feature gets std 1)."""
    x = np.asarray(x_train, np.float64)
    mean, std = x.mean(0), x.std(0)
    return standardize(mean, np.where(std > 0, std, 1.0))


def block(raw_shape, steps=(), *, classes=None) -> dict:
    """A preprocessing block from the raw example shape and the steps, in order."""
    steps = [dict(s) for s in steps]
    return {
        "format": FORMAT,
        "raw_shape": [int(d) for d in raw_shape],
        "input_shape": list(output_shape(raw_shape, steps)),
        "steps": steps,
        "classes": None if classes is None else [str(c) for c in classes],
    }


def identity(input_shape) -> dict:
    """The block of a model that takes its inputs as they come."""
    return block(input_shape)


def output_shape(raw_shape, steps) -> tuple:
    """The example shape after `steps`; `ConfigError` for an unknown op or a reshape
    that changes the size."""
    shape = tuple(int(d) for d in raw_shape)
    for step in steps:
        op = step.get("op") if isinstance(step, dict) else None
        if op not in OPS:
            raise ConfigError(f"unknown preprocessing op {op!r}; expected one of {list(OPS)}")
        if op == "reshape":
            new = tuple(step["shape"])
            if math.prod(new) != math.prod(shape):
                raise ConfigError(
                    f"preprocessing reshape to {new} needs {math.prod(new)} values per "
                    f"example, got shape {shape}"
                )
            shape = new
    return shape


def check(block_: dict) -> dict:
    """`block_` if it is a well-formed block, else `ConfigError` naming what is wrong."""
    if not isinstance(block_, dict) or block_.get("format") != FORMAT:
        got = block_.get("format") if isinstance(block_, dict) else type(block_).__name__
        raise ConfigError(f"expected a preprocessing block of format {FORMAT!r}, got {got!r}")
    if tuple(block_["input_shape"]) != output_shape(block_["raw_shape"], block_["steps"]):
        raise ConfigError(
            f"preprocessing block: steps map {block_['raw_shape']} to "
            f"{output_shape(block_['raw_shape'], block_['steps'])}, not {block_['input_shape']}"
        )
    return block_


def transforms(block_: dict, asarray=None) -> list:
    """The steps as functions of a batch `x -> x`, constants made once by `asarray`
    (default float32 numpy; pass `jnp.asarray` or `torch.tensor` for other arrays)."""
    asarray = asarray or (lambda v: np.asarray(v, np.float32))
    functions = []
    for step in check(block_)["steps"]:
        if step["op"] == "reshape":
            shape = tuple(step["shape"])
            functions.append(lambda x, shape=shape: x.reshape((-1, *shape)))
        elif step["op"] == "scale":
            factor = asarray(step["factor"])
            functions.append(lambda x, f=factor: x * f)
        else:
            # [1, *example]: broadcasts against [N, *example] without rank promotion
            mean, std = (asarray(np.asarray(step[k], np.float32)[None]) for k in ("mean", "std"))
            functions.append(lambda x, m=mean, s=std: (x - m) / s)
    return functions


def check_raw(block_: dict, x, where: str = "inputs") -> np.ndarray:
    """`x` as float32 `[N, *raw_shape]`, or `ShapeError` naming expected and got."""
    x = np.asarray(x)
    raw = tuple(block_["raw_shape"])
    if x.ndim == len(raw) and x.shape == raw:  # one example
        x = x[None]
    if x.shape[1:] != raw:
        raise ShapeError(f"{where}: expected raw inputs of shape (N, {', '.join(map(str, raw))})"
                         f" (what the model was trained from), got {x.shape}")  # fmt: skip
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ShapeError(f"{where}: expected numbers, got dtype {x.dtype}")
    return x.astype(np.float32)


def apply(block_: dict, x, where: str = "inputs") -> np.ndarray:
    """Raw inputs `[N, *raw_shape]` (or one example) -> model inputs, float32 numpy."""
    x = check_raw(block_, x, where)
    for f in transforms(block_):
        x = f(x)
    return np.asarray(x, np.float32)


def invert(block_: dict, z) -> np.ndarray:
    """Raw inputs whose preprocessing is (about) `z` `[N, *input_shape]`: the probe
    batches of exports live in raw space."""
    z = np.asarray(z, np.float64)
    shapes = [tuple(block_["raw_shape"])]
    for step in block_["steps"]:
        shapes.append(output_shape(shapes[-1], [step]))
    for step, before in zip(reversed(block_["steps"]), reversed(shapes[:-1])):
        if step["op"] == "reshape":
            z = z.reshape((-1, *before))
        elif step["op"] == "scale":
            z = z / step["factor"]
        else:
            z = z * np.asarray(step["std"]) + np.asarray(step["mean"])
    return z.astype(np.float32)


def remaining(block_: dict, done: dict) -> dict:
    """The block of `block_`'s steps after those of `done` (a data set loaded with
    fewer steps, e.g. unstandardised): `ConfigError` unless `done` is a prefix."""
    steps, prefix = check(block_)["steps"], check(done)["steps"]
    if block_["raw_shape"] != done["raw_shape"] or steps[: len(prefix)] != prefix:
        raise ConfigError(
            f"the data set's preprocessing {prefix} (raw shape {done['raw_shape']}) is not "
            f"the start of the run's {steps} (raw shape {block_['raw_shape']})"
        )
    return block(done["input_shape"], steps[len(prefix) :], classes=block_["classes"])


def is_identity(block_: dict) -> bool:
    return not block_["steps"]
