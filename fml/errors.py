"""fml's exceptions: every error fml raises on purpose is an `FmlError`.

Each subclass also derives from the builtin a Python user would expect to catch
(`ValueError`, `TypeError`, `ImportError`, `OSError`), so both styles work.
"""


class FmlError(Exception):
    """Base class of every error fml raises deliberately."""


class ShapeError(FmlError, ValueError):
    """An array has the wrong rank or size."""


class DTypeError(FmlError, TypeError):
    """An array has the wrong dtype."""


class DataError(FmlError, ValueError):
    """Data is empty, non-finite, or has labels out of range."""


class UnknownNameError(FmlError, ValueError):
    """A family, data set, optimizer, loss or activation name is not known."""


class ConfigError(FmlError, ValueError):
    """A hyperparameter or option is out of its valid range."""


class TrainingError(FmlError, RuntimeError):
    """Training diverged (NaN or inf loss) or cannot continue."""


class CheckpointError(FmlError, OSError):
    """A checkpoint is missing, corrupt, or does not match its model."""


class MissingDependencyError(FmlError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def unknown(kind: str, name, known) -> UnknownNameError:
    """An `UnknownNameError` listing the valid choices."""
    return UnknownNameError(f"unknown {kind} {name!r}; expected one of {sorted(known)}")


def require(module: str, extra: str):
    """Imports `module`, or raises `MissingDependencyError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is required for this; install it with `pip install 'fml[{extra}]'`"
        ) from e


def in_range(value, name: str, low: float, high: float, *, closed: str = "left") -> float:
    """`value` as a float if it is a real number in the interval, else `ConfigError`.

    `closed` is "left" (`[low, high)`), "right", "both" or "neither".
    """
    import math
    import numbers

    left = "[" if closed in ("left", "both") else "("
    right = "]" if closed in ("right", "both") else ")"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        value = float(value)
        ok = (low <= value if left == "[" else low < value) and (
            value <= high if right == "]" else value < high
        )
    if not ok:
        raise ConfigError(f"expected {name} in {left}{low}, {high}{right}, got {value!r}")
    return value
