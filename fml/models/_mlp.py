"""Multi-layer perceptron: `params = {"dense_0": {"w", "b"}, ..., "dense_{n-1}": ...}`."""

from collections.abc import Sequence

import jax

from fml import layers
from fml._model import Model
from fml.errors import ConfigError, in_range
from fml.models._common import (
    compute_dtype,
    flat_features,
    in_compute_dtype,
    input_size,
    positive_int,
)


def mlp(
    widths: Sequence[int],
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    dtype: str = "float32",
) -> Model:
    """A stack of dense layers on the flattened input; the last layer is linear.

    Args:
      widths: output width of each layer, e.g. `[128, 10]` for 784-128-10.
      activation: between layers (see `fml.layers.ACTIVATIONS`).
      dropout: probability of dropping each hidden unit in training.
      dtype: the compute dtype ("float32", "bfloat16", "float16"): params and
        inputs are cast to it in `apply`, outputs come back float32; params and
        optimizer state stay float32 (mixed precision).

    Example:
      >>> import jax, fml
      >>> model = fml.models.mlp([128, 10])
      >>> params = model.init(jax.random.key(0), (784,))
      >>> model.apply(params, jax.numpy.ones((2, 784))).shape
      (2, 10)
    """
    if isinstance(widths, str) or not hasattr(widths, "__iter__"):
        raise ConfigError(f"expected widths to be a list of positive ints, got {widths!r}")
    widths = [positive_int(w, "every width") for w in widths]
    if not widths:
        raise ConfigError("mlp needs at least one width (the output layer)")
    act = layers.activation(activation)
    dropout = in_range(dropout, "dropout rate", 0.0, 1.0)
    spec = {
        "family": "mlp",
        "widths": widths,
        "activation": activation,
        "dropout": float(dropout),
        "dtype": compute_dtype(dtype),
    }
    names = [f"dense_{i}" for i in range(len(widths))]

    def init(key, input_shape):
        sizes = [input_size(input_shape), *widths]
        keys = jax.random.split(key, len(widths))
        return {
            name: layers.dense_init(k, n_in, n_out)
            for name, k, n_in, n_out in zip(names, keys, sizes[:-1], sizes[1:])
        }

    def apply(params, x, *, key=None, train=False):
        h = flat_features(x, params[names[0]]["w"].shape[0], "mlp")
        keys = jax.random.split(key, len(names)) if key is not None else [None] * len(names)
        for name, k in zip(names[:-1], keys):
            h = act(layers.dense(params[name], h))
            h = layers.dropout(h, dropout, key=k, train=train)
        return layers.dense(params[names[-1]], h)

    return Model(init, in_compute_dtype(apply, spec["dtype"], "mlp"), spec)
