"""Model families. Each factory closes over hyperparameters and returns a `Model`.

Families: `linear_regression`, `logistic_regression`, `svm`, `mlp`, `cnn`, `rnn`,
and `flax` (a Flax Linen or NNX module, `from_flax`; flax is imported only then).
`from_spec(model.spec)` rebuilds any of them; `default_loss` and
`default_metric` give each family's objective.
"""

from fml._model import Model, canonical_spec
from fml.errors import ConfigError, FmlError, unknown
from fml.models._cnn import avg_pool, cnn, conv, dense, dropout, flatten, max_pool
from fml.models._flax import flax_module, from_flax
from fml.models._linear import least_squares, linear_regression, logistic_regression, svm
from fml.models._mlp import mlp
from fml.models._rnn import rnn

FAMILIES = {
    "linear_regression": linear_regression,
    "logistic_regression": logistic_regression,
    "svm": svm,
    "mlp": mlp,
    "cnn": cnn,
    "rnn": rnn,
    "flax": flax_module,
}


def from_spec(spec: dict) -> Model:
    """Rebuilds the model that `spec` (a `Model.spec`, e.g. read from JSON) describes."""
    if not isinstance(spec, dict) or "family" not in spec:
        raise ConfigError(f"expected a model spec dict with a 'family' key, got {spec!r}")
    try:
        spec = canonical_spec(spec)
    except (TypeError, ValueError, RecursionError) as e:
        raise ConfigError(f"expected a JSON model spec, got {type(e).__name__}: {e}") from e
    family = spec.pop("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise unknown("model family", family, FAMILIES)
    try:
        return FAMILIES[family](**spec)
    except FmlError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(f"spec does not fit family {family!r}: {type(e).__name__}: {e}") from e


# Families whose `apply` ignores `train` and `key`.
DETERMINISTIC_FAMILIES = ("linear_regression", "logistic_regression", "svm")


def is_deterministic(spec: dict) -> bool:
    """Whether the model's `apply` ignores `train` and `key` (no dropout)."""
    return spec.get("family") in DETERMINISTIC_FAMILIES


def default_loss(spec: dict, task: str = "classification") -> str:
    """The loss a family trains with by default (for `task` where the family allows both)."""
    family = spec["family"]
    if family == "linear_regression":
        return "mse"
    if family == "svm":
        return spec["loss"]
    if family == "logistic_regression":
        binary = spec["num_classes"] == 2 and spec["binary"] == "sigmoid"
        return "sigmoid_cross_entropy" if binary else "softmax_cross_entropy"
    return "mse" if task == "regression" else "softmax_cross_entropy"


def default_metric(spec: dict, task: str = "classification") -> str:
    """ "r2" for regression, "accuracy" for classification."""
    return "r2" if default_loss(spec, task) == "mse" else "accuracy"


def l2_strength(spec: dict, num_train: int) -> float:
    """The L2 penalty coefficient a family's objective carries: `1 / (C n)` for the
    SVM (LinearSVC's objective scaled by `1 / (C n)`), else 0."""
    if spec["family"] == "svm":
        return 1.0 / (spec["C"] * num_train)
    return 0.0


__all__ = [
    "FAMILIES",
    "Model",
    "avg_pool",
    "cnn",
    "conv",
    "default_loss",
    "default_metric",
    "dense",
    "dropout",
    "flatten",
    "from_flax",
    "from_spec",
    "is_deterministic",
    "l2_strength",
    "least_squares",
    "linear_regression",
    "logistic_regression",
    "max_pool",
    "mlp",
    "rnn",
    "svm",
]
