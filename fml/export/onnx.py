"""ONNX export through the torch module (`torch.onnx.export(..., dynamo=True)`), with a
dynamic batch and, for RNNs, a dynamic time axis; checked in onnxruntime. Flax
modules, which have no torch module, are translated from their jaxpr
(`fml.export.jaxpr_onnx`).

The graph takes `x` (float32 `[batch, *input_shape]`, or raw `[batch, *raw_shape]`
with a `preprocessing` block, whose steps it then applies) and returns `y`. Needs
the `onnx` extra (onnx, onnxscript, onnxruntime) besides torch.
"""

import jax.numpy as jnp
import numpy as np

from fml import preprocessing as preprocessing_lib
from fml._model import Model
from fml.errors import require
from fml.export.jaxpr_onnx import write_jaxpr_onnx

INPUT_NAME = "x"
OUTPUT_NAME = "y"


def write_onnx(model: Model, params, input_shape, path, *, preprocessing=None) -> None:
    """Writes `model` with `params` (after `preprocessing`'s steps, when given) as one
    self-contained `.onnx` file (unverified; `to_onnx` verifies and writes atomically)."""
    if model.family == "flax":  # no torch module: from the jaxpr
        if preprocessing is not None:
            model, input_shape = _after_preprocessing(model, preprocessing)
        write_jaxpr_onnx(model, params, tuple(input_shape), path)
        return
    torch = require("torch", "torch")
    require("onnxscript", "onnx")
    from fml.export.torch import deployable_module, dynamic_dims

    net = deployable_module(model, params, input_shape, preprocessing)
    dims = dynamic_dims(model, input_shape, preprocessing)
    raw_shape = preprocessing["raw_shape"] if preprocessing else input_shape
    example = torch.zeros((2, *raw_shape))
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=(dims,),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _after_preprocessing(model: Model, block: dict):
    """`model` taking raw inputs (the block's steps first, in jnp), and the raw shape."""
    steps = preprocessing_lib.transforms(block, asarray=lambda v: jnp.asarray(v, jnp.float32))

    def apply(params, x, **kwargs):
        for step in steps:
            x = step(x)
        return model.apply(params, x, **kwargs)

    return model._replace(apply=apply), tuple(block["raw_shape"])


def run_onnx(model: Model, input_shape, path, x, *, preprocessing=None) -> np.ndarray:
    """Runs the `.onnx` file at `path` on `x` in onnxruntime (CPU)."""
    del model, input_shape, preprocessing  # the graph holds them
    ort = require("onnxruntime", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(x, np.float32)})[0]


def to_onnx(model: Model, params, path, *, input_shape, tolerance: float | None = None):
    """Exports an `.onnx` file, verified in onnxruntime against fml, written atomically.

    Args:
      model: any fml model PyTorch can express (see `fml.export.torch`).
      params: its params.
      path: the `.onnx` file to write (replaced only on success).
      input_shape: the input shape without batch, as given to `model.init`.
      tolerance: see `fml.export.export`.

    Returns:
      `fml.export.Exported` with the max abs diff seen.
    """
    from fml.export import export

    return export(model, params, path, to="onnx", input_shape=input_shape, tolerance=tolerance)
