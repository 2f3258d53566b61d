"""Predictors: a trained model with its preprocessing, taking raw inputs.

`fml.load(run_dir)` returns a `Predictor` for any run directory (`fml train`,
`fml sweep`, `fml.rundir.save_run`). It applies the run's saved preprocessing
(`preprocessing.json`: reshape, scaling, standardisation with the training
statistics) to raw inputs, then runs the model in fixed-size jitted batches on
JAX's default device.

Example:
  >>> import fml, sklearn.datasets
  >>> predictor = fml.load("runs/logistic_regression-breast_cancer-seed0")  # doctest: +SKIP
  >>> x, y = sklearn.datasets.load_breast_cancer(return_X_y=True)           # raw rows
  >>> predictor.evaluate(x, y)["accuracy"]                                   # doctest: +SKIP
  0.98...
"""

import pathlib

import numpy as np

from fml import preprocessing as preprocessing_lib
from fml import rundir
from fml._model import Model
from fml.data import check_arrays
from fml.errors import ConfigError
from fml.inference import evaluate, predict
from fml.models import default_loss


class Predictor:
    """A model, its params and its preprocessing; every method takes raw inputs.

    Attributes:
      model: the fml `Model`.
      params: its params.
      preprocessing: the block applied to raw inputs (`fml.preprocessing`).
      task: "classification" or "regression".
      classes: class names by label index, or None.
      input_shape: one raw example's shape.
    """

    def __init__(
        self,
        model: Model,
        params,
        *,
        preprocessing: dict | None = None,
        input_shape=None,
        task: str | None = None,
        batch_size: int = 1024,
    ):
        """Args:
        model: an fml model.
        params: its params.
        preprocessing: a block (`fml.preprocessing`), e.g. a `Dataset`'s.
        input_shape: without `preprocessing`: the model's input shape (inputs are
          taken as the model takes them).
        task: "classification" or "regression"; default from the model's loss.
        batch_size: examples per jitted call (memory bound; outputs do not depend on it).
        """
        if preprocessing is None:
            if input_shape is None:
                raise ConfigError("a Predictor needs preprocessing= or input_shape=")
            preprocessing = preprocessing_lib.identity(input_shape)
        self.model, self.params = model, params
        self.preprocessing = preprocessing_lib.check(preprocessing)
        if task is None:
            task = "regression" if default_loss(model.spec) == "mse" else "classification"
        if task not in ("classification", "regression"):
            raise ConfigError(f"expected task 'classification' or 'regression', got {task!r}")
        self.task, self.batch_size = task, batch_size
        self.classes = self.preprocessing["classes"]
        self.input_shape = tuple(self.preprocessing["raw_shape"])

    def __repr__(self) -> str:
        steps = [s["op"] for s in self.preprocessing["steps"]]
        return f"Predictor({self.model.family}, {self.task}, raw inputs {self.input_shape}, steps {steps})"

    def transform(self, x) -> np.ndarray:
        """Raw inputs `[N, *input_shape]` (or one example) -> the model's inputs."""
        return preprocessing_lib.apply(self.preprocessing, x, where="predictor inputs")

    def decision_function(self, x) -> np.ndarray:
        """The model's outputs on raw `x`: logits (`[N, K]`, or `[N, 1]` for a binary
        sigmoid model), SVM scores, or regression values `[N, outputs]`."""
        return predict(self.model, self.params, self.transform(x), batch_size=self.batch_size)

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities `[N, K]` (binary sigmoid models: `[N, 2]`); rows sum to 1."""
        if self.task != "classification" or self.model.family == "svm":
            raise ConfigError(
                f"{self.model.family} ({self.task}) gives no probabilities; use "
                "decision_function for its scores"
            )
        return probabilities(self.decision_function(x))

    def predict(self, x) -> np.ndarray:
        """Class labels `[N]` (int) for classifiers; values `[N]` (one output) or
        `[N, outputs]` for regression."""
        outputs = self.decision_function(x)
        if self.task == "regression":
            return outputs[:, 0] if outputs.shape[-1] == 1 else outputs
        return labels(outputs)

    def evaluate(self, x, y) -> dict:
        """Loss and metric on raw `x` and targets `y`, as `fml.evaluate` computes them."""
        x = self.transform(x)
        x, y = check_arrays(x, y, task=self.task, where="predictor evaluation data")
        return evaluate(self.model, self.params, x, y, task=self.task, batch_size=self.batch_size)


def probabilities(outputs) -> np.ndarray:
    """Softmax of logits `[N, K]`; for one logit column, `[1 - sigmoid, sigmoid]`."""
    outputs = np.asarray(outputs, np.float64)
    if outputs.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-outputs[:, 0]))
        return np.stack([1.0 - p, p], axis=-1).astype(np.float32)
    z = np.exp(outputs - outputs.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).astype(np.float32)


def labels(outputs) -> np.ndarray:
    """Class labels from logits or scores: argmax, or `> 0` for one column (int32)."""
    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        return (outputs[:, 0] > 0).astype(np.int32)
    return np.argmax(outputs, axis=-1).astype(np.int32)


def load(run_dir, *, batch_size: int = 1024) -> Predictor:
    """The `Predictor` of a run directory: its model, final params and preprocessing.

    Args:
      run_dir: a directory written by `fml train`, `fml sweep` or `fml.rundir.save_run`.
      batch_size: examples per jitted call.

    Raises:
      CheckpointError: no run there, or its files are damaged or do not match.
    """
    model, params, config = rundir.load_run(run_dir)
    block = rundir.load_preprocessing(run_dir, config["input_shape"])
    if tuple(block["input_shape"]) != tuple(config["input_shape"]):
        raise ConfigError(
            f"{pathlib.Path(run_dir) / rundir.PREPROCESSING} gives inputs of shape "
            f"{tuple(block['input_shape'])}, the model takes {tuple(config['input_shape'])}"
        )
    return Predictor(
        model, params, preprocessing=block, task=config.get("task"), batch_size=batch_size
    )
