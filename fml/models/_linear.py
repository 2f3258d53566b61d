"""Linear families: linear regression (with a closed form), logistic regression
and the linear SVM. Each flattens its input and applies one dense layer,
`params = {"dense": {"w": [D, K], "b": [K]}}`."""

import jax.numpy as jnp
import numpy as np

from fml import layers
from fml._model import Model
from fml.errors import ConfigError, DataError, ShapeError
from fml.models._common import flat_features, input_size, positive_int


def _linear_model(spec: dict, outputs: int) -> Model:
    family = spec["family"]

    def init(key, input_shape):
        return {"dense": layers.dense_init(key, input_size(input_shape), outputs)}

    def apply(params, x, *, key=None, train=False):
        del key, train
        x = flat_features(x, params["dense"]["w"].shape[0], family)
        return layers.dense(params["dense"], x)

    return Model(init, apply, spec)


def linear_regression(outputs: int = 1) -> Model:
    """Ordinary least squares: `y = x @ w + b`, output `[B, outputs]`.

    Its default loss is mean squared error and its metric R². For the exact fit
    use `fml.models.least_squares`.

    Example:
      >>> import jax, fml
      >>> model = fml.models.linear_regression()
      >>> params = model.init(jax.random.key(0), (3,))
      >>> model.apply(params, jax.numpy.ones((5, 3))).shape
      (5, 1)
    """
    positive_int(outputs, "outputs")
    return _linear_model({"family": "linear_regression", "outputs": outputs}, outputs)


def logistic_regression(num_classes: int, *, binary: str = "sigmoid") -> Model:
    """Multinomial logistic regression; returns logits.

    Args:
      num_classes: number of classes, at least 2.
      binary: for 2 classes, "sigmoid" (one logit `[B, 1]`, sigmoid cross-entropy,
        as scikit-learn) or "softmax" (two logits `[B, 2]`). Ignored for more classes.
    """
    positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"logistic_regression needs num_classes >= 2, got {num_classes}")
    if binary not in ("sigmoid", "softmax"):
        raise ConfigError(f"expected binary='sigmoid' or 'softmax', got {binary!r}")
    outputs = 1 if num_classes == 2 and binary == "sigmoid" else num_classes
    spec = {"family": "logistic_regression", "num_classes": num_classes, "binary": binary}
    return _linear_model(spec, outputs)


def svm(num_classes: int, *, loss: str = "hinge", C: float = 1.0) -> Model:
    """Linear soft-margin SVM; one score `[B, 1]` for 2 classes, else one-vs-rest `[B, K]`.

    The training objective is LinearSVC's divided by `C * n_train` (same minimiser):
    `mean_i hinge_i + ||W||² / (2 C n_train)`, with `loss` "hinge" or
    "squared_hinge". `fit` sets the penalty from `C` and the training-set size;
    the sweep API passes `C` as data, so changing it does not recompile.
    """
    positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"svm needs num_classes >= 2, got {num_classes}")
    if loss not in ("hinge", "squared_hinge"):
        raise ConfigError(f"expected svm loss 'hinge' or 'squared_hinge', got {loss!r}")
    if not C > 0:
        raise ConfigError(f"expected C > 0, got {C}")
    spec = {"family": "svm", "num_classes": num_classes, "loss": loss, "C": float(C)}
    return _linear_model(spec, 1 if num_classes == 2 else num_classes)


def least_squares(model: Model, x, y, *, l2: float = 0.0) -> dict:
    """The exact (ridge) least-squares params of a `linear_regression` model.

    Solves `min ||x w + b - y||² + l2 ||w||²` (the intercept is not penalised, as
    in scikit-learn's Ridge) in float64 with numpy's `lstsq`.

    Args:
      model: a `linear_regression` model.
      x: `[N, ...]` inputs (flattened to `[N, D]`).
      y: `[N]` or `[N, outputs]` targets.
      l2: ridge strength, >= 0.

    Returns:
      params for `model.apply`.
    """
    if model.family != "linear_regression":
        raise ConfigError(f"least_squares needs a linear_regression model, got {model.family}")
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape[0] == 0:
        raise DataError("least_squares: expected at least one example, got 0")
    x = x.reshape(x.shape[0], -1)
    y2 = y.reshape(y.shape[0], -1)
    outputs = model.spec["outputs"]
    if y2.shape != (x.shape[0], outputs):
        raise ShapeError(
            f"least_squares: expected y of shape ({x.shape[0]}, {outputs}), got {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y2).all()):
        raise DataError("least_squares: x and y must be finite (found NaN or inf)")
    if l2 < 0:
        raise ConfigError(f"expected l2 >= 0, got {l2}")
    x_mean, y_mean = x.mean(0), y2.mean(0)
    xc, yc = x - x_mean, y2 - y_mean
    if l2 > 0:
        d = x.shape[1]
        xc = np.concatenate([xc, np.sqrt(l2) * np.eye(d)])
        yc = np.concatenate([yc, np.zeros((d, outputs))])
    w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    b = y_mean - x_mean @ w
    return {"dense": {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}


# The closed form is reachable from the family too: `linear_regression.least_squares(...)`.
linear_regression.least_squares = least_squares
