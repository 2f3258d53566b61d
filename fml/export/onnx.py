"""ONNX export through the torch module (`torch.onnx.export(..., dynamo=True)`), with a
dynamic batch and, for RNNs, a dynamic time axis; checked in onnxruntime. Flax
modules, which have no torch module, are translated from their jaxpr
(`fml.export.jaxpr_onnx`).

The graph takes `x` (float32 `[batch, *input_shape]`) and returns `y`. Needs the
`onnx` extra (onnx, onnxscript, onnxruntime) besides torch.
"""

import numpy as np

from fml._model import Model
from fml.errors import require
from fml.export.jaxpr_onnx import write_jaxpr_onnx

INPUT_NAME = "x"
OUTPUT_NAME = "y"


def write_onnx(model: Model, params, input_shape, path) -> None:
    """Writes `model` with `params` as one self-contained `.onnx` file (unverified;
    `to_onnx` verifies and writes atomically)."""
    if model.family == "flax":  # no torch module: from the jaxpr
        write_jaxpr_onnx(model, params, input_shape, path)
        return
    torch = require("torch", "torch")
    require("onnxscript", "onnx")
    from fml.export.torch import to_state_dict, torch_module

    net = torch_module(model, input_shape)
    net.load_state_dict(to_state_dict(model, params, input_shape), strict=True)
    dims = {0: torch.export.Dim("batch")}
    if model.family == "rnn":
        dims[1] = torch.export.Dim("time")
    example = torch.zeros((2, *input_shape))
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


def run_onnx(model: Model, input_shape, path, x) -> np.ndarray:
    """Runs the `.onnx` file at `path` on `x` in onnxruntime (CPU)."""
    del model, input_shape
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
