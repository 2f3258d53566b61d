"""fml: a JAX-compiled functional ML engine.

Models are pure `Model(init, apply, spec)` pairs, params are nested dicts,
training steps are single XLA programs driven by optax.

Example:
  >>> import fml
  >>> data = fml.data.load("mnist1d")
  >>> model = fml.models.mlp([100, 100, 10])
  >>> state, history = fml.fit(model, data, epochs=20, batch_size=100, quiet=True)
"""

from fml import data, errors, layers, losses, metrics, models, parallel, preprocessing, train
from fml._model import Model
from fml._runtime import apply_process_settings
from fml.errors import FmlError
from fml.predictor import Predictor, load
from fml.sweep import sweep
from fml.train import TrainState, evaluate, fit, predict

__version__ = "0.1.0"

apply_process_settings()  # before any XLA program runs: see fml/_runtime.py


def __getattr__(name):
    # `fml.checkpoint` imports orbax: loaded on first use, not with `import fml`.
    if name == "checkpoint":
        import importlib

        return importlib.import_module("fml.checkpoint")
    raise AttributeError(f"module 'fml' has no attribute {name!r}")


__all__ = [
    "FmlError",
    "Model",
    "Predictor",
    "TrainState",
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
    "sweep",
    "train",
]
