"""fml: a JAX-compiled functional ML engine.

Models are pure `Model(init, apply, spec)` pairs, params are nested dicts,
training steps are single XLA programs driven by optax.

Example:
  >>> import fml
  >>> data = fml.data.load("mnist1d")
  >>> model = fml.models.mlp([100, 100, 10])
  >>> state, history = fml.fit(model, data, epochs=20, batch_size=100, quiet=True)
"""

from fml import (
    batching,
    callbacks,
    checkpoint,
    data,
    errors,
    layers,
    losses,
    metrics,
    models,
    parallel,
    preprocessing,
    runners,
    runtime,
    step,
    train,
)
from fml._model import Model
from fml.errors import FmlError
from fml.inference import evaluate, predict
from fml.predictor import Predictor, load
from fml.step import TrainState
from fml.sweep import sweep
from fml.train import fit

__version__ = "0.1.0"


__all__ = [
    "FmlError",
    "Model",
    "Predictor",
    "TrainState",
    "batching",
    "callbacks",
    "checkpoint",
    "data",
    "errors",
    "evaluate",
    "fit",
    "layers",
    "load",
    "losses",
    "metrics",
    "models",
    "parallel",
    "predict",
    "preprocessing",
    "runners",
    "runtime",
    "step",
    "sweep",
    "train",
]
