"""scikit-learn estimators over fml: `FmlClassifier`, `FmlRegressor`, `FmlSearchCV`.

The estimators keep only hyperparameters (constructor arguments) and, once
fitted, the model's spec and its params and optimizer state as numpy arrays:
the model's functions are rebuilt from the spec (`fml.models.from_spec`), so a
fitted estimator pickles and clones like any scikit-learn one. Training is
`fml.fit`; a model built from the same spec is reused, so refitting (in
`cross_val_score`, `GridSearchCV`) compiles once per data shape.

`FmlSearchCV` is a `GridSearchCV` whose whole grid × folds (over the values
`fml.sweep` takes as data: learning rate, l2, seed, optimizer hyperparameters)
trains as one vmapped program; see its docstring.

Example:
  >>> from sklearn.datasets import load_iris
  >>> from fml.sklearn import FmlClassifier
  >>> X, y = load_iris(return_X_y=True)
  >>> clf = FmlClassifier("logistic_regression", learning_rate=0.05, epochs=50).fit(X, y)
  >>> clf.score(X, y) > 0.9
  True
"""

import functools
import json
import math
import numbers
import time

import jax
import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone, is_classifier
from sklearn.metrics import check_scoring
from sklearn.model_selection import GridSearchCV, ParameterGrid, check_cv
from sklearn.utils import _safe_indexing, indexable
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from fml import models as models_lib
from fml import step as step_lib
from fml import train as train_lib
from fml._model import Model, canonical_spec
from fml.errors import TrainingError
from fml.inference import predict
from fml.sweep import sweep

# Families whose output width the estimator sets from the targets, and the spec key.
_SIZED = {
    "linear_regression": "outputs",
    "logistic_regression": "num_classes",
    "svm": "num_classes",
    "cnn": "num_classes",
    "rnn": "num_classes",
}
_CLASSIFIER_ONLY = ("logistic_regression", "svm")
_REGRESSOR_ONLY = ("linear_regression",)
_PREDICT_ROWS = 256
_PROBABILISTIC_LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy")


@functools.lru_cache(maxsize=32)
def _model(spec_json: str) -> Model:
    """The model of a spec; one object per spec, so fit's compiled programs are reused."""
    return models_lib.from_spec(json.loads(spec_json))


def model_spec(estimator, num_outputs: int) -> dict:
    """The fml spec of `estimator`'s family with `num_outputs` outputs (classes, or
    regression targets)."""
    family = estimator.family
    kwargs = dict(estimator.model_kwargs or {})
    if family == "mlp":
        widths = [*map(int, estimator.hidden_layer_sizes), num_outputs]
        spec = {"widths": widths, "activation": estimator.activation, "dropout": estimator.dropout}
        spec.update(kwargs)
    elif family in _SIZED:
        spec = {**kwargs, _SIZED[family]: num_outputs}
    else:  # flax and any other family: the caller's kwargs say everything
        spec = kwargs
    return canonical_spec({"family": family, **spec})


def _check_family(estimator, kind: str) -> None:
    wrong = _REGRESSOR_ONLY if kind == "classifier" else _CLASSIFIER_ONLY
    if estimator.family in wrong:
        raise ValueError(f"{type(estimator).__name__} cannot use family {estimator.family!r}")
    for name in ("epochs", "batch_size"):
        value = getattr(estimator, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"expected {name} to be a positive int, got {value!r}")


def _as_inputs(estimator, x) -> np.ndarray:
    """`x` `[N, features]` as float32 `[N, *input_shape]`."""
    x = np.asarray(x, np.float32)
    if estimator.input_shape is None:
        return x
    shape = tuple(int(d) for d in estimator.input_shape)
    if math.prod(shape) != x.shape[1]:
        raise ValueError(
            f"expected {math.prod(shape)} features for input_shape {shape}, got {x.shape[1]}"
        )
    return x.reshape(x.shape[0], *shape)


def fit_options(estimator) -> dict:
    """The `fml.fit` keyword arguments an estimator's hyperparameters give."""
    return {
        "optimizer": estimator.optimizer,
        "learning_rate": float(estimator.learning_rate),
        "epochs": int(estimator.epochs),
        "batch_size": int(estimator.batch_size),
        "l2": None if estimator.l2 is None else float(estimator.l2),
        "fused": bool(estimator.fused),
        "optimizer_kwargs": dict(estimator.optimizer_kwargs or {}) or None,
        "quiet": True,
    }


def _host_state(state: step_lib.TrainState) -> dict:
    """A `TrainState` as numpy arrays (its key as key data): picklable, device-free."""
    host = jax.device_get(state._replace(key=jax.random.key_data(state.key)))
    return {"state": host, "key_impl": str(jax.random.key_impl(state.key))}


def _device_state(saved: dict) -> step_lib.TrainState:
    state = saved["state"]
    key = jax.random.wrap_key_data(np.asarray(state.key), impl=saved["key_impl"])
    return jax.device_put(state._replace(key=key))


class _FmlEstimator(BaseEstimator):
    """What `FmlClassifier` and `FmlRegressor` share: hyperparameters, fitting, outputs."""

    _kind = ""

    def __init__(
        self,
        family: str = "mlp",
        *,
        hidden_layer_sizes=(100,),
        activation: str = "relu",
        dropout: float = 0.0,
        model_kwargs: dict | None = None,
        input_shape=None,
        optimizer: str = "adam",
        learning_rate: float = 1e-3,
        optimizer_kwargs: dict | None = None,
        epochs: int = 20,
        batch_size: int = 32,
        l2: float | None = None,
        seed: int = 0,
        fused: bool = True,
    ):
        self.family = family
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.dropout = dropout
        self.model_kwargs = model_kwargs
        self.input_shape = input_shape
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.optimizer_kwargs = optimizer_kwargs
        self.epochs = epochs
        self.batch_size = batch_size
        self.l2 = l2
        self.seed = seed
        self.fused = fused

    # -- fitting

    def _targets_of(self, y) -> np.ndarray:
        """The targets the model trains on (subclasses: encoded labels, float targets)."""
        raise NotImplementedError

    def _train(self, x, y, num_outputs: int, *, epochs: int, state=None, seed=None):
        """Trains on encoded `(x, y)`; sets `spec_` and the state; returns self."""
        _check_family(self, self._kind)
        spec = model_spec(self, num_outputs)
        model = _model(json.dumps(spec, sort_keys=True))
        options = {**fit_options(self), "epochs": epochs}
        seed = self.seed if seed is None else seed
        state, history = train_lib.fit(
            model, (_as_inputs(self, x), y), seed=int(seed), state=state, **options
        )
        self.spec_ = model.spec
        self._state = _host_state(state)
        self.loss_curve_ = [float(v) for v in history["train_loss"]]
        return self

    def _adopt(self, model: Model, state: dict, x, y) -> None:
        """Becomes the estimator fitted on `(x, y)` (raw) with `state` (a `_host_state`)."""
        x, y = _validated(self, x, y, reset=True, kind=self._kind)
        self._targets_of(y)
        self._partial_calls = 0
        self.spec_ = model.spec
        self._state = state

    def _fitted_model(self) -> Model:
        check_is_fitted(self, "spec_")
        return _model(json.dumps(self.spec_, sort_keys=True))

    @property
    def params_(self):
        """The fitted model's params (nested dict of numpy arrays)."""
        check_is_fitted(self, "spec_")
        return self._state["state"].params

    def _outputs(self, x) -> np.ndarray:
        """The model's outputs on `x` (validated), float64 `[N, outputs]`."""
        model = self._fitted_model()
        x = _as_inputs(self, validate_data(self, x, reset=False, dtype=[np.float64, np.float32]))
        # padded to whole chunks: every row goes through the same program, so a
        # row's outputs do not depend on how many rows came with it
        n = x.shape[0]
        padded = np.zeros((-(-n // _PREDICT_ROWS) * _PREDICT_ROWS, *x.shape[1:]), x.dtype)
        padded[:n] = x
        outputs = predict(model, self.params_, padded, batch_size=_PREDICT_ROWS)[:n]
        return np.asarray(outputs, np.float64).reshape(n, -1)

    def _next_partial(self, x, y, num_outputs: int):
        """One more pass over `(x, y)` from the current state (a fresh one the first time)."""
        calls = getattr(self, "_partial_calls", 0)
        state = None
        if calls:
            state = _device_state(self._state)
            # each call: its own shuffle and dropout keys, from the epoch's start
            key = jax.random.fold_in(jax.random.key(int(self.seed)), calls)
            state = state._replace(step=state.step * 0, key=key)
        self._train(x, y, num_outputs, epochs=1, state=state, seed=(int(self.seed) + calls) % 2**31)
        self._partial_calls = calls + 1
        return self


def _validated(estimator, x, y, *, reset: bool, kind: str):
    multi = kind == "regressor"
    return validate_data(
        estimator,
        x,
        y,
        reset=reset,
        dtype=[np.float64, np.float32],
        multi_output=multi,
        y_numeric=multi,
    )


class FmlClassifier(ClassifierMixin, _FmlEstimator):
    """A scikit-learn classifier trained by `fml.fit`.

    Labels may be any values scikit-learn accepts (strings, non-contiguous
    integers): `classes_` holds them sorted, and the model is trained on their
    indices.

    Args:
      family: "mlp" (default), "logistic_regression", "svm", "cnn", "rnn" or
        "flax"; the output width is set from the classes (not for "flax").
      hidden_layer_sizes, activation, dropout: the MLP's hidden widths,
        activation and dropout rate.
      model_kwargs: further arguments of the family (e.g. `{"C": 1.0}` for the
        SVM, `{"layer_specs": [...]}` for the CNN, the spec for "flax").
      input_shape: reshape each row of `X` to this shape (e.g. `(8, 8, 1)` for a CNN).
      optimizer, learning_rate, optimizer_kwargs, epochs, batch_size, l2, seed,
        fused: as in `fml.fit` (`l2=None`: the family's default).

    Attributes:
      classes_: the class labels. n_features_in_: features seen in `fit`.
      spec_: the fitted model's spec. params_: its params. loss_curve_: the
      training loss per epoch.
    """

    _kind = "classifier"

    def fit(self, X, y):
        """Trains a fresh model on `(X, y)`; returns self."""
        X, y = _validated(self, X, y, reset=True, kind=self._kind)
        y = self._targets_of(y)
        self._partial_calls = 0
        return self._train(X, y, self._num_outputs(), epochs=int(self.epochs))

    def partial_fit(self, X, y, classes=None):
        """One pass over `(X, y)`, continuing the previous training; the first call
        needs `classes` (all labels) unless `y` holds every class."""
        first = not getattr(self, "_partial_calls", 0)
        X, y = _validated(self, X, y, reset=first, kind=self._kind)
        y = self._encode(y, classes=classes) if first else self._index(y)
        return self._next_partial(X, y, self._num_outputs())

    def _targets_of(self, y) -> np.ndarray:
        """The encoded labels of `y`, setting `classes_`."""
        return self._encode(y, classes=None)

    def _encode(self, y, *, classes):
        check_classification_targets(y)
        self.classes_ = np.unique(y if classes is None else np.asarray(classes))
        if len(self.classes_) < 2:
            raise ValueError(
                f"FmlClassifier needs at least 2 classes; only one class is present: "
                f"{self.classes_.tolist()}"
            )
        return self._index(y)

    def _index(self, y) -> np.ndarray:
        index = np.searchsorted(self.classes_, y)
        index = np.minimum(index, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[index], y):
            unseen = sorted(set(np.asarray(y).tolist()) - set(self.classes_.tolist()))
            raise ValueError(f"labels {unseen} are not among classes_ {self.classes_.tolist()}")
        return index.astype(np.int32)

    def _num_outputs(self) -> int:
        return len(self.classes_)

    def _loss(self) -> str:
        return models_lib.default_loss(self.spec_, "classification")

    def decision_function(self, X) -> np.ndarray:
        """Scores `[N, n_classes]`; for two classes one score `[N]`, > 0 for `classes_[1]`."""
        z = self._outputs(X)
        if len(self.classes_) == 2:
            return z[:, 0] if z.shape[1] == 1 else z[:, 1] - z[:, 0]
        return z

    def _has_proba(self) -> bool:
        family = self.spec_["family"] if hasattr(self, "spec_") else self.family
        if family == "svm":
            return False
        if hasattr(self, "spec_"):
            return self._loss() in _PROBABILISTIC_LOSSES
        return True

    @available_if(_has_proba)
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities `[N, n_classes]` (softmax, or sigmoid for one logit)."""
        z = self._outputs(X)
        if z.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    @available_if(_has_proba)
    def predict_log_proba(self, X) -> np.ndarray:
        return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The predicted labels (values of `classes_`)."""
        z = self._outputs(X)
        index = (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else np.argmax(z, axis=1)
        return self.classes_[index]


class FmlRegressor(RegressorMixin, _FmlEstimator):
    """A scikit-learn regressor trained by `fml.fit` (mean squared error).

    `y` may be `[N]` or `[N, targets]`. Arguments as `FmlClassifier`'s; family
    "mlp" (default), "linear_regression", "cnn", "rnn" or "flax".
    """

    _kind = "regressor"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Trains a fresh model on `(X, y)`; returns self."""
        X, y = _validated(self, X, y, reset=True, kind=self._kind)
        self._partial_calls = 0
        y = self._targets_of(y)
        return self._train(X, y, self._targets(y), epochs=int(self.epochs))

    def partial_fit(self, X, y):
        """One pass over `(X, y)`, continuing the previous training."""
        first = not getattr(self, "_partial_calls", 0)
        X, y = _validated(self, X, y, reset=first, kind=self._kind)
        y = self._targets_of(y) if first else np.asarray(y, np.float32)
        return self._next_partial(X, y, self._targets(y))

    def _targets_of(self, y) -> np.ndarray:
        """`y` as float32 regression targets, remembering its rank for `predict`."""
        self._y_ndim = np.ndim(y)
        return np.asarray(y, np.float32)

    @staticmethod
    def _targets(y) -> int:
        return 1 if y.ndim == 1 else y.shape[1]

    def predict(self, X) -> np.ndarray:
        """Predictions `[N]` (or `[N, targets]` when fitted on 2-D `y`)."""
        z = self._outputs(X)
        return z[:, 0] if self._y_ndim == 1 else z


# ------------------------------------------------------------------ search


# Hyperparameters `fml.sweep` takes as data: a grid over them is one program.
SWEPT = ("learning_rate", "l2", "seed")


def _static_key(params: dict) -> str:
    return json.dumps({k: repr(v) for k, v in params.items() if k not in SWEPT}, sort_keys=True)


class FmlSearchCV(GridSearchCV):
    """`GridSearchCV` over an `FmlClassifier` / `FmlRegressor` whose whole grid ×
    folds trains as one vmapped program (`fml.sweep` with one subset per member).

    The values of `learning_rate`, `l2` and `seed` in the grid are data: every
    (candidate, fold) pair is a member of one sweep, trained exactly as
    `GridSearchCV`'s `clone(estimator).set_params(**candidate).fit(X[train],
    y[train])` would be (same init, batches and dropout keys, up to float rounding).
    Candidates differing in anything else (hidden sizes, epochs, ...) form one
    sweep per distinct setting. Scores, `cv_results_`, ranking, `best_*_` and the
    refit are `GridSearchCV`'s; `predict`, `score` and the rest are inherited.

    Arguments are `GridSearchCV`'s (`n_jobs` and `pre_dispatch` are unused). The
    estimator must be an fml estimator with a minibatch optimizer (not lbfgs),
    not a `Pipeline` (its steps would fit per fold); for classifiers, every
    training fold must hold every class (use a stratified `cv`).

    Attributes:
      sweeps_: the `fml.sweep` results, one per distinct static setting.
    """

    def fit(self, X, y=None, **params):
        """Runs the search: one sweep per static setting, then the refit."""
        if params:
            raise ValueError(f"FmlSearchCV.fit takes no fit parameters, got {sorted(params)}")
        if not isinstance(self.estimator, _FmlEstimator):
            raise ValueError(
                "FmlSearchCV needs an FmlClassifier or FmlRegressor (not a Pipeline: "
                f"use GridSearchCV for that), got {type(self.estimator).__name__}"
            )
        if callable(self.refit) or isinstance(self.scoring, list | tuple | dict):
            raise ValueError("FmlSearchCV supports one scoring and refit=True/False")
        X, y = indexable(X, y)
        folds = list(check_cv(self.cv, y, classifier=is_classifier(self.estimator)).split(X, y))
        candidates = list(ParameterGrid(self.param_grid))
        self.scorer_ = check_scoring(self.estimator, self.scoring)
        self.multimetric_ = False
        shape = (len(candidates), len(folds))
        test, train, fit_time, score_time = (np.full(shape, np.nan) for _ in range(4))
        groups: dict = {}
        for i, candidate in enumerate(candidates):
            groups.setdefault(_static_key(candidate), []).append(i)
        self.sweeps_ = []
        for indices in groups.values():
            static = {k: v for k, v in candidates[indices[0]].items() if k not in SWEPT}
            base = clone(self.estimator).set_params(**static)
            started = time.perf_counter()
            result, members = _fold_sweep(base, [candidates[i] for i in indices], folds, X, y)
            seconds = (time.perf_counter() - started) / len(members)
            self.sweeps_.append(result)
            for k, (c, f, estimator) in enumerate(members):
                i = indices[c]
                fit_time[i, f] = seconds
                if result.table[k]["diverged"]:
                    if self.error_score == "raise":
                        raise TrainingError(f"candidate {candidates[i]} diverged on fold {f}")
                    test[i, f] = train[i, f] = self.error_score
                    continue
                started = time.perf_counter()
                test_rows, train_rows = folds[f][1], folds[f][0]
                test[i, f] = self.scorer_(estimator, *_rows(X, y, test_rows))
                score_time[i, f] = time.perf_counter() - started
                if self.return_train_score:
                    train[i, f] = self.scorer_(estimator, *_rows(X, y, train_rows))
        self.cv_results_ = _cv_results(candidates, test, train, fit_time, score_time,
                                       self.return_train_score)  # fmt: skip
        self.n_splits_ = len(folds)
        self.best_index_ = int(self.cv_results_["rank_test_score"].argmin())
        self.best_score_ = float(self.cv_results_["mean_test_score"][self.best_index_])
        self.best_params_ = candidates[self.best_index_]
        if self.refit:
            started = time.perf_counter()
            self.best_estimator_ = clone(self.estimator).set_params(**self.best_params_).fit(X, y)
            self.refit_time_ = time.perf_counter() - started
        return self


def _rows(X, y, rows):
    return _safe_indexing(X, rows), _safe_indexing(y, rows)


def _fold_sweep(base: _FmlEstimator, candidates: list[dict], folds, X, y):
    """One `fml.sweep` of every (candidate, fold) of `base`'s static setting; returns
    it and `[(candidate, fold, fitted estimator)]` in member order."""
    if not isinstance(base.optimizer, str) or base.optimizer not in step_lib.OPTIMIZERS:
        raise ValueError(
            f"FmlSearchCV trains minibatch optimizers {sorted(step_lib.OPTIMIZERS)}, got "
            f"{base.optimizer!r} (use GridSearchCV)"
        )
    probe = clone(base)
    x, targets = _validated(probe, X, y, reset=True, kind=probe._kind)
    targets = probe._targets_of(targets)
    if isinstance(probe, FmlClassifier):
        for f, (rows, _) in enumerate(folds):
            if len(np.unique(targets[rows])) != len(probe.classes_):
                raise ValueError(
                    f"training fold {f} lacks some of the classes {probe.classes_.tolist()}; "
                    "use a stratified cv"
                )
        num_outputs = len(probe.classes_)
    else:
        num_outputs = FmlRegressor._targets(targets)
    _check_family(probe, probe._kind)
    model = _model(json.dumps(model_spec(probe, num_outputs), sort_keys=True))
    configs, subsets, members = [], [], []
    for c, candidate in enumerate(candidates):
        settings = clone(base).set_params(**candidate)
        for f, (rows, _) in enumerate(folds):
            l2 = settings.l2
            if l2 is None:
                l2 = models_lib.l2_strength(model.spec, len(rows))
            configs.append(
                {"seed": int(settings.seed), "learning_rate": float(settings.learning_rate),
                 "l2": float(l2)}
            )  # fmt: skip
            subsets.append(rows)
            members.append((c, f, clone(settings)))
    options = fit_options(base)
    result = sweep(
        model,
        (_as_inputs(base, x), targets),
        configs=configs,
        subsets=subsets,
        optimizer=options["optimizer"],
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        fused=options["fused"],
        optimizer_kwargs=options["optimizer_kwargs"],
    )
    stacked = _host_state(result.state)  # fetched once, sliced per member on the host
    for k, (_, f, estimator) in enumerate(members):
        member = {**stacked, "state": jax.tree.map(lambda a, k=k: a[k], stacked["state"])}
        estimator._adopt(model, member, *_rows(X, y, folds[f][0]))
    return result, members


def _cv_results(candidates, test, train, fit_time, score_time, with_train: bool) -> dict:
    """`GridSearchCV`'s `cv_results_` layout from per-(candidate, split) arrays."""
    results: dict = {"params": candidates}
    names = sorted({k for c in candidates for k in c})
    for name in names:
        column = np.ma.MaskedArray(np.empty(len(candidates), object), mask=True)
        for i, c in enumerate(candidates):
            if name in c:
                column[i] = c[name]
        results[f"param_{name}"] = column
    arrays = {"test_score": test, "fit_time": fit_time, "score_time": score_time}
    if with_train:
        arrays["train_score"] = train
    for name, values in arrays.items():
        if name.endswith("_score"):
            for split in range(values.shape[1]):
                results[f"split{split}_{name}"] = values[:, split]
        results[f"mean_{name}"] = values.mean(axis=1)
        results[f"std_{name}"] = values.std(axis=1)
    mean = results["mean_test_score"]
    ranked = np.where(np.isnan(mean), -np.inf, mean)
    results["rank_test_score"] = rankdata(-ranked, method="min").astype(np.int32)
    return results
