"""TensorFlow export: a SavedModel made by `jax2tf` from fml's jitted apply.

The SavedModel holds the params as `tf.Variable`s on a `tf.Module` (`.params`, the
fml param dict; gradients flow to them, so it can be fine-tuned in TF) and one
`serving_default` signature taking `x` (float32 `[batch, *input_shape]`, batch
polymorphic; for RNNs time is polymorphic too) and returning `{"y": outputs}`.
Its graph is one `XlaCallModule` op serialised for `platforms`, so it loads and
runs with TensorFlow alone, without jax or fml. With a `preprocessing` block the
graph applies it first: `x` is then a raw input `[batch, *raw_shape]`.

`write_tflite` converts that SavedModel to a TFLite flatbuffer (built-in ops), run
with `tf.lite.Interpreter` (`run_tflite` resizes its batch to the input's).
"""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fml import preprocessing as preprocessing_lib
from fml._model import Model
from fml.errors import ExportError, require
from fml.export.reference import float32_model, highest_precision

INPUT_NAME = "x"
OUTPUT_NAME = "y"
# Where a SavedModel runs by default: its one `XlaCallModule` op holds a program
# for each, chosen by TensorFlow when it runs.
PLATFORMS = ("cpu", "cuda", "tpu")


def _polymorphic_input(model: Model, input_shape, raw_shape) -> tuple[str, list]:
    """jax2tf's polymorphic shape for `x` and the matching `tf.TensorSpec` shape: the
    batch always, an RNN's time axis too when the raw input is the model's."""
    if model.family == "rnn" and tuple(raw_shape) == tuple(input_shape):
        return "(b, t, _)", [None, None, input_shape[-1]]
    return "(b, ...)", [None, *raw_shape]


def _with_preprocessing(model: Model, block):
    """`model.apply` on raw inputs: the block's steps (jnp, float32) first."""
    steps = preprocessing_lib.transforms(block, asarray=lambda v: jnp.asarray(v, jnp.float32))

    def apply(params, x):
        for step in steps:
            x = step(x)
        return model.apply(params, x)

    return apply


def write_saved_model(
    model: Model, params, input_shape, path, *, platforms=PLATFORMS, preprocessing=None
) -> None:
    """Writes `model` with `params` (after `preprocessing`'s steps, when given) as a
    SavedModel directory at `path` (unverified; `to_saved_model` verifies and writes
    atomically). Its program computes in float32 at `highest` matmul precision on
    every platform (no TF32 on a GPU)."""
    tf = require("tensorflow", "tf")
    from jax.experimental import jax2tf

    block = preprocessing or preprocessing_lib.identity(input_shape)
    poly, shape = _polymorphic_input(model, tuple(input_shape), block["raw_shape"])
    model = float32_model(model)
    apply = jax2tf.convert(
        jax.jit(highest_precision(_with_preprocessing(model, block))),
        polymorphic_shapes=[None, poly],
        native_serialization_platforms=tuple(platforms),
    )
    variables = jax.tree.map(lambda a: tf.Variable(np.asarray(a), name="param"), params)
    module = tf.Module()
    module.params = variables

    @tf.function(
        input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)], autograph=False
    )
    def serve(x):
        return {OUTPUT_NAME: apply(variables, x)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def run_saved_model(model: Model, input_shape, path, x, *, preprocessing=None) -> np.ndarray:
    """Loads the SavedModel at `path` and runs its `serving_default` on `x`."""
    del model, input_shape, preprocessing  # the graph holds them
    tf = require("tensorflow", "tf")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(**{INPUT_NAME: tf.constant(np.asarray(x, np.float32))})[OUTPUT_NAME].numpy()


def to_saved_model(
    model: Model,
    params,
    path,
    *,
    input_shape,
    platforms=PLATFORMS,
    tolerance: float | None = None,
):
    """Exports a SavedModel, verified against fml on a probe batch, written atomically.

    Args:
      model: any fml model.
      params: its params.
      path: the SavedModel directory to write (replaced only on success).
      input_shape: the input shape without batch, as given to `model.init`.
      platforms: where the SavedModel must run ("cpu", "cuda", "tpu").
      tolerance: see `fml.export.export`.

    Returns:
      `fml.export.Exported` with the max abs diff seen.

    Example:
      >>> import jax, fml
      >>> from fml.export.tensorflow import to_saved_model
      >>> model = fml.models.rnn("gru", 8, num_classes=3)
      >>> params = model.init(jax.random.key(0), (20, 2))
      >>> to_saved_model(model, params, "/tmp/gru", input_shape=(20, 2)).max_abs_diff < 1e-5
      True
    """
    from fml.export import export

    return export(
        model,
        params,
        path,
        to="savedmodel",
        input_shape=input_shape,
        tolerance=tolerance,
        platforms=platforms,
    )


def write_tflite(model: Model, params, input_shape, path, *, preprocessing=None) -> None:
    """Writes `model` (with `preprocessing`, when given) as a TFLite flatbuffer at `path`:
    a CPU SavedModel converted with TFLite's built-in ops (unverified; `fml.export.export`
    verifies and writes atomically)."""
    tf = require("tensorflow", "tf")
    with tempfile.TemporaryDirectory() as tmp:
        saved = pathlib.Path(tmp) / "saved_model"
        write_saved_model(
            model, params, input_shape, saved, platforms=("cpu",), preprocessing=preprocessing
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        try:
            flatbuffer = converter.convert()
        except Exception as e:  # the converter raises ConverterError and others
            first = str(e).strip().splitlines()[:3]
            raise ExportError(
                f"TFLite cannot convert {model.family}'s SavedModel: {' '.join(first)[:400]}"
            ) from e
    pathlib.Path(path).write_bytes(flatbuffer)


def run_tflite(model: Model, input_shape, path, x, *, preprocessing=None) -> np.ndarray:
    """Runs the TFLite flatbuffer at `path` on `x` with `tf.lite.Interpreter`."""
    del model, input_shape, preprocessing  # the flatbuffer holds them
    tf = require("tensorflow", "tf")
    x = np.asarray(x, np.float32)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape), strict=False)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])
