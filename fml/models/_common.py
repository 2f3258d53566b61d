"""Checks and helpers shared by the model families."""

import math

import jax.numpy as jnp
import numpy as np

from fml.errors import ConfigError, DTypeError, ShapeError


def check_float_input(x, family: str):
    """`x` as an array; raises `DTypeError` unless it is a floating-point one."""
    if not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise DTypeError(f"{family}: expected a floating-point array x, got {e}") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(
            f"{family}: expected floating-point inputs, got {type(x).__name__} of dtype {x.dtype}"
        )
    return jnp.asarray(x)


def check_input_shape(x, expected: tuple, family: str):
    """Raises `ShapeError` unless `x` is `[B, *expected]`."""
    if tuple(x.shape[1:]) != tuple(expected):
        raise ShapeError(
            f"{family}: expected x of shape (B, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}"
        )


def flat_features(x, in_features: int, family: str):
    """Flattens `[B, ...]` to `[B, in_features]`, checking the feature count."""
    x = check_float_input(x, family)
    if x.ndim < 2 or math.prod(x.shape[1:]) != in_features:
        raise ShapeError(
            f"{family}: expected x of shape (B, {in_features}) (or (B, ...) with "
            f"{in_features} features), got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], in_features)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"expected {name} to be a positive int, got {value!r}")
    return value


def input_size(input_shape) -> int:
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ShapeError(f"expected input_shape of positive ints (no batch dim), got {shape}")
    return math.prod(shape)
