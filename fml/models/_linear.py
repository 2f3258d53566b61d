"""Linear families: linear regression (with a closed form), logistic regression
and the linear SVM. Each flattens its input and applies one dense layer,
`params = {"dense": {"w": [D, K], "b": [K]}}`."""

import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

from fml import layers
from fml._model import Model
from fml.errors import ConfigError, DataError, ShapeError
from fml.models._common import (
    compute_dtype,
    flat_features,
    in_compute_dtype,
    input_size,
    positive_int,
)


def _linear_model(spec: dict, outputs: int) -> Model:
    family = spec["family"]
    spec["init"] = layers.check_init(spec["init"])

    def init(key, input_shape):
        size = input_size(input_shape)
        return {"dense": layers.dense_init(key, size, outputs, init=spec["init"])}

    def apply(params, x, *, key=None, train=False):
        del key, train
        x = flat_features(x, params["dense"]["w"].shape[0], family)
        return layers.dense(params["dense"], x)

    return Model(init, in_compute_dtype(apply, spec["dtype"], family), spec)


def linear_regression(outputs: int = 1, *, init: str = "lecun", dtype: str = "float32") -> Model:
    """Ordinary least squares: `y = x @ w + b`, output `[B, outputs]`.

    Its default loss is mean squared error and its metric R². For the exact fit
    use `fml.models.least_squares`. `init`: "lecun" (default) or "torch" (see
    `fml.layers.INITS`); `dtype` is the compute dtype (as `mlp`'s).

    Example:
      >>> import jax, fml
      >>> model = fml.models.linear_regression()
      >>> params = model.init(jax.random.key(0), (3,))
      >>> model.apply(params, jax.numpy.ones((5, 3))).shape
      (5, 1)
    """
    positive_int(outputs, "outputs")
    spec = {
        "family": "linear_regression",
        "outputs": outputs,
        "init": init,
        "dtype": compute_dtype(dtype),
    }
    return _linear_model(spec, outputs)


def logistic_regression(
    num_classes: int, *, binary: str = "sigmoid", init: str = "lecun", dtype: str = "float32"
) -> Model:
    """Multinomial logistic regression; returns logits.

    Args:
      num_classes: number of classes, at least 2.
      binary: for 2 classes, "sigmoid" (one logit `[B, 1]`, sigmoid cross-entropy,
        as scikit-learn) or "softmax" (two logits `[B, 2]`). Ignored for more classes.
      init: "lecun" (fml's: LeCun-normal weights, zero biases) or "torch"
        (PyTorch's `nn.Linear` defaults: uniform in ±1/√fan_in); see `fml.layers.INITS`.
      dtype: the compute dtype (as `mlp`'s).
    """
    positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"logistic_regression needs num_classes >= 2, got {num_classes}")
    if binary not in ("sigmoid", "softmax"):
        raise ConfigError(f"expected binary='sigmoid' or 'softmax', got {binary!r}")
    outputs = 1 if num_classes == 2 and binary == "sigmoid" else num_classes
    spec = {
        "family": "logistic_regression",
        "num_classes": num_classes,
        "binary": binary,
        "init": init,
        "dtype": compute_dtype(dtype),
    }
    return _linear_model(spec, outputs)


def svm(
    num_classes: int,
    *,
    loss: str = "hinge",
    C: float = 1.0,
    init: str = "lecun",
    dtype: str = "float32",
) -> Model:
    """Linear soft-margin SVM; one score `[B, 1]` for 2 classes, else one-vs-rest `[B, K]`.

    The training objective is LinearSVC's divided by `C * n_train` (same minimiser):
    `mean_i hinge_i + ||W||² / (2 C n_train)`, with `loss` "hinge" or
    "squared_hinge". `fit` sets the penalty from `C` and the training-set size;
    the sweep API passes `C` as data, so changing it does not recompile. `init`:
    "lecun" (default) or "torch" (see `fml.layers.INITS`); `dtype` is the compute
    dtype (as `mlp`'s).
    """
    positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"svm needs num_classes >= 2, got {num_classes}")
    if loss not in ("hinge", "squared_hinge"):
        raise ConfigError(f"expected svm loss 'hinge' or 'squared_hinge', got {loss!r}")
    if not C > 0:
        raise ConfigError(f"expected C > 0, got {C}")
    spec = {
        "family": "svm",
        "num_classes": num_classes,
        "loss": loss,
        "C": float(C),
        "init": init,
        "dtype": compute_dtype(dtype),
    }
    return _linear_model(spec, 1 if num_classes == 2 else num_classes)


# Rows per float64 block of the Gram accumulation (3.3 MB at 100 features).
_GRAM_ROWS = 4096
# Above this condition number of the centred Gram matrix (cond(x)² ≈ 1e10), the
# normal equations would lose digits a float32 answer keeps: solve by QR instead.
_GRAM_MAX_CONDITION = 1e10


def least_squares(model: Model, x, y, *, l2: float = 0.0) -> dict:
    """The exact (ridge) least-squares params of a `linear_regression` model.

    Solves `min ||x w + b - y||² + l2 ||w||²` (the intercept is not penalised, as
    in scikit-learn's Ridge) in float64: from the centred Gram matrix `xcᵀ xc`,
    accumulated in float64 over blocks of rows (so a float32 `x` is never copied
    whole), by an eigendecomposition; when that matrix is too ill-conditioned for
    float32 accuracy, by numpy's `lstsq` (QR) on the whole float64 design.

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
    x = np.asarray(x)
    y = np.asarray(y, np.float64)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
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
    x_mean, gram, xty = _centred_moments(x, y2)
    y_mean = y2.mean(0)
    d = x.shape[1]
    eigenvalues, eigenvectors = np.linalg.eigh(gram + l2 * np.eye(d))
    if eigenvalues[0] > eigenvalues[-1] / _GRAM_MAX_CONDITION:
        w = eigenvectors @ ((eigenvectors.T @ xty) / eigenvalues[:, None])
    else:
        w = _lstsq(x, y2, x_mean, y_mean, l2)
    b = y_mean - x_mean @ w
    return {"dense": {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}


def _centred_moments(x_NxD, y_NxK):
    """`(mean [D], xcᵀ xc [D, D], xcᵀ yc [D, K])` of the centred data, in float64,
    from one pass over blocks of rows shifted by an estimate of the mean."""
    n, d = x_NxD.shape
    shift = x_NxD[:_GRAM_ROWS].mean(0, dtype=np.float64)
    yc_NxK = y_NxK - y_NxK.mean(0)
    total, gram, xty = np.zeros(d), np.zeros((d, d)), np.zeros((d, y_NxK.shape[1]))
    # One BLAS thread: on calls this small, OpenBLAS's threads spend more time
    # waiting for each other than working (1M x 100 on 2 busy cores: 0.5 s on one
    # thread, 2 to 20 s on two).
    with threadpool_limits(1, user_api="blas"):
        for start in range(0, n, _GRAM_ROWS):
            block = x_NxD[start : start + _GRAM_ROWS].astype(np.float64)
            block -= shift
            total += block.sum(0)
            gram += np.dot(block.T, block)  # numpy takes x.T x to BLAS syrk
            xty += block.T @ yc_NxK[start : start + _GRAM_ROWS]
    offset = total / n  # the true mean minus the shift
    gram -= n * np.outer(offset, offset)
    return shift + offset, gram, xty


def _lstsq(x_NxD, y_NxK, x_mean, y_mean, l2: float):
    """The ridge solution by QR (numpy's `lstsq`) on the whole centred float64 design."""
    xc = x_NxD.astype(np.float64) - x_mean
    yc = y_NxK - y_mean
    if l2 > 0:
        d = x_NxD.shape[1]
        xc = np.concatenate([xc, np.sqrt(l2) * np.eye(d)])
        yc = np.concatenate([yc, np.zeros((d, y_NxK.shape[1]))])
    return np.linalg.lstsq(xc, yc, rcond=None)[0]


# The closed form is reachable from the family too: `linear_regression.least_squares(...)`.
linear_regression.least_squares = least_squares
