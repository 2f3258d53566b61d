"""Convolutional networks, 1D (`[B, W, C]`) or 2D (`[B, H, W, C]`), channels-last.

A CNN is a list of layer specs (plain dicts, built by the helpers below).
Layer `i` with weights stores them under `"{type}_{i}"`, e.g. `"conv_0"`,
`"dense_3"`; pooling, flatten and dropout hold no params. A dense layer on a
spatial input flattens it first (row-major, so channels vary fastest).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fml import layers
from fml._model import Model
from fml.errors import ConfigError, ShapeError, in_range, unknown
from fml.models._common import check_float_input, compute_dtype, in_compute_dtype, positive_int


def conv(
    features: int,
    kernel: int | Sequence[int] = 3,
    *,
    stride: int | Sequence[int] = 1,
    padding: layers.Padding = "SAME",
    activation: str | None = "relu",
) -> dict:
    """A convolution layer spec; `padding` is "SAME", "VALID" or an int per side."""
    if isinstance(padding, list | tuple):
        padding = [list(p) for p in padding]
    return {
        "type": "conv",
        "features": features,
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "activation": activation,
    }


def max_pool(window: int | Sequence[int] = 2, *, stride=None, padding: str = "VALID") -> dict:
    """A max-pooling layer spec; the stride defaults to the window."""
    return {"type": "max_pool", "window": window, "stride": stride, "padding": padding}


def avg_pool(window: int | Sequence[int] = 2, *, stride=None, padding: str = "VALID") -> dict:
    """An average-pooling layer spec (padding excluded from the mean)."""
    return {"type": "avg_pool", "window": window, "stride": stride, "padding": padding}


def dense(features: int, *, activation: str | None = "relu") -> dict:
    """A dense layer spec (flattens a spatial input first)."""
    return {"type": "dense", "features": features, "activation": activation}


def flatten() -> dict:
    return {"type": "flatten"}


def dropout(rate: float) -> dict:
    """A dropout layer spec; `rate` is the probability of dropping a unit."""
    return {"type": "dropout", "rate": rate}


_PARAM_FREE = ("max_pool", "avg_pool", "flatten", "dropout")
LAYER_TYPES = ("conv", "dense", *_PARAM_FREE)


def _spatial(value, ndim: int):
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def _check_layer(layer: dict, index: int) -> None:
    kind = layer.get("type")
    if kind not in LAYER_TYPES:
        raise unknown(f"cnn layer type (layer {index})", kind, LAYER_TYPES)
    if kind in ("conv", "dense"):
        positive_int(layer["features"], f"features of layer {index}")
        layers.activation(layer["activation"])
    if kind == "conv":
        layers.explicit_padding(layer["padding"], 1)
    if kind == "dropout":
        in_range(layer["rate"], f"dropout rate of layer {index}", 0.0, 1.0)


def _apply_layer(layer: dict, params, x, *, key, train):
    kind = layer["type"]
    if kind == "conv":
        stride = _spatial(layer["stride"], x.ndim - 2)
        y = layers.conv(params, x, stride=stride, padding=layer["padding"])
        return layers.activation(layer["activation"])(y)
    if kind == "dense":
        x = layers.flatten(x)
        if x.shape[1] != params["w"].shape[0]:
            raise ShapeError(
                f"cnn: dense layer expected {params['w'].shape[0]} input features, got "
                f"{x.shape[1]}; is the input's spatial size the one the model was built for?"
            )
        return layers.activation(layer["activation"])(layers.dense(params, x))
    if kind in ("max_pool", "avg_pool"):
        pool = layers.max_pool if kind == "max_pool" else layers.avg_pool
        return pool(x, layer["window"], layer["stride"], layer["padding"])
    if kind == "flatten":
        return layers.flatten(x)
    return layers.dropout(x, layer["rate"], key=key, train=train)


def _init_layer(layer: dict, key, in_shape: tuple):
    kind = layer["type"]
    if kind == "conv":
        kernel = _spatial(layer["kernel"], len(in_shape) - 1)
        return layers.conv_init(key, in_shape[-1], layer["features"], kernel)
    if kind == "dense":
        size = 1
        for d in in_shape:
            size *= d
        return layers.dense_init(key, size, layer["features"])
    return None


def cnn(
    layer_specs: Sequence[dict], num_classes: int | None = None, *, dtype: str = "float32"
) -> Model:
    """A convolutional network from a list of layer specs.

    Args:
      layer_specs: built with `conv`, `max_pool`, `avg_pool`, `dense`, `flatten`,
        `dropout` from `fml.models`. 1D or 2D follows from the input shape given
        to `init`: `(W, C)` or `(H, W, C)`.
      num_classes: if given, a final linear dense layer with this many outputs.
      dtype: the compute dtype (as `mlp`'s).

    Example (the seed MNIST net):
      >>> import jax, fml
      >>> from fml.models import cnn, conv, max_pool, dense
      >>> model = cnn([conv(32, 3), max_pool(2), dense(128)], num_classes=10)
      >>> params = model.init(jax.random.key(0), (28, 28, 1))
      >>> model.apply(params, jax.numpy.ones((2, 28, 28, 1))).shape
      (2, 10)
    """
    specs = [dict(layer) for layer in layer_specs]
    if num_classes is not None:
        specs.append(dense(positive_int(num_classes, "num_classes"), activation=None))
    if not specs:
        raise ConfigError("cnn needs at least one layer")
    for i, layer in enumerate(specs):
        _check_layer(layer, i)
    spec = {
        "family": "cnn",
        "layer_specs": specs,
        "num_classes": None,
        "dtype": compute_dtype(dtype),
    }
    names = [f"{layer['type']}_{i}" for i, layer in enumerate(specs)]

    def init(key, input_shape):
        shape = tuple(input_shape)
        if len(shape) not in (2, 3):
            raise ConfigError(f"cnn: expected input_shape (W, C) or (H, W, C), got {shape}")
        params, keys = {}, jax.random.split(key, len(specs))
        x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
        for layer, name, k in zip(specs, names, keys):
            if min(x.shape[1:]) < 1:
                raise ShapeError(
                    f"cnn: input_shape {shape} is too small: layer {name} gets {x.shape[1:]}"
                )
            p = _init_layer(layer, k, tuple(x.shape[1:]))
            if p is not None:
                params[name] = p
            x = jax.eval_shape(
                lambda x, p=p, layer=layer: _apply_layer(layer, p, x, key=None, train=False), x
            )
        return params

    def apply(params, x, *, key=None, train=False):
        x = check_float_input(x, "cnn")
        first = next(n for n in names if n in params)
        w = params[first]["w"]
        if first.startswith("conv") and (x.ndim != w.ndim or x.shape[-1] != w.shape[-2]):
            layout = "(B, W, C)" if w.ndim == 3 else "(B, H, W, C)"
            raise ShapeError(
                f"cnn: expected x of shape {layout} with C={w.shape[-2]}, got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:  # an empty batch: the shapes of a batch of one, no rows
            one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
            y = jax.eval_shape(lambda x1: apply(params, x1, key=key, train=train), one)
            return jnp.zeros((0, *y.shape[1:]), y.dtype)
        keys = jax.random.split(key, len(specs)) if key is not None else [None] * len(specs)
        for layer, name, k in zip(specs, names, keys):
            x = _apply_layer(layer, params.get(name), x, key=k, train=train)
        return x

    return Model(init, in_compute_dtype(apply, spec["dtype"], "cnn"), spec)
