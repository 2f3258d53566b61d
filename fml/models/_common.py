"""Checks and helpers shared by the model families."""

import math

import jax
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


# The compute dtypes a family accepts (`dtype=`); params and optimizer state stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype) -> str:
    """The name of compute dtype `dtype` (a name or a dtype); `ConfigError` unless it is
    one of `COMPUTE_DTYPES`."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"expected a compute dtype in {COMPUTE_DTYPES}, got {dtype!r}")
    return name


def in_compute_dtype(apply, dtype: str, family: str):
    """`apply` run in compute dtype `dtype`: the floating params and `x` are cast to it
    on the way in (their gradients come back in the params' own float32), the
    outputs to float32 on the way out, so losses and metrics are float32 whatever
    the compute dtype. Inputs of any floating dtype are accepted. "float32" is a
    floor, not a cast: narrower inputs (float16 data) are widened to it, float64
    ones (under `jax.enable_x64`) stay float64."""
    dt = jnp.dtype(dtype)
    floor = dt == jnp.float32

    def cast(a, to, floor: bool):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(jnp.promote_types(a.dtype, to) if floor else to)

    def apply_in_dtype(params, x, **kwargs):
        x = check_float_input(x, family)
        params = jax.tree.map(lambda a: cast(a, dt, floor), params)
        y = apply(params, cast(x, dt, floor), **kwargs)
        return jax.tree.map(lambda a: cast(a, jnp.float32, True), y)

    return apply_in_dtype


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
