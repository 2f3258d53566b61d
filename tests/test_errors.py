"""Bad input gets a typed fml error, raised before XLA sees the data, naming what was
expected and what came."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fml
from fml import models
from fml.cli import main
from fml.errors import (
    ConfigError,
    DataError,
    DTypeError,
    FmlError,
    ShapeError,
    TrainingError,
    UnknownNameError,
)

X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)


def _fit(model=None, x=X, y=Y, **kwargs):
    return fml.fit(model or models.logistic_regression(2), (x, y), epochs=1, quiet=True, **kwargs)


@pytest.mark.parametrize(
    "model,x,match",
    [
        (
            models.mlp([3]),
            np.zeros((2, 5), np.float32),
            r"expected x of shape \(B, 4\).*got \(2, 5\)",
        ),
        (
            models.cnn([models.conv(2, 3)], 3),
            np.zeros((2, 6, 4), np.float32),
            r"\(B, H, W, C\) with C=1.*got \(2, 6, 4\)",
        ),
        (
            models.cnn([models.conv(2, 3)], 3),
            np.zeros((2, 6, 5, 1), np.float32),
            r"expected 72 input features, got 60",
        ),
        (models.rnn("lstm", 3), np.zeros((2, 7), np.float32), r"expected x of shape \(B, T, 2\)"),
    ],
)
def test_apply_rejects_wrong_input_shape(model, x, match):
    shapes = {"mlp": (4,), "cnn": (6, 6, 1), "rnn": (7, 2)}[model.family]
    params = model.init(jax.random.key(0), shapes)
    with pytest.raises(ShapeError, match=match):
        model.apply(params, x)
    with pytest.raises(ShapeError, match=match):
        jax.jit(model.apply)(params, x)


def test_apply_rejects_integer_inputs():
    model = models.mlp([3])
    params = model.init(jax.random.key(0), (4,))
    with pytest.raises(DTypeError, match="expected floating-point inputs, got .*dtype int32"):
        model.apply(params, jnp.zeros((2, 4), jnp.int32))


def test_rnn_rejects_bad_lengths():
    model = models.rnn("gru", 3)
    params = model.init(jax.random.key(0), (5, 2))
    x = jnp.zeros((2, 5, 2))
    with pytest.raises(ShapeError, match=r"lengths of shape \(2,\), got \(3,\)"):
        model.apply(params, x, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(DTypeError, match="integer lengths"):
        model.apply(params, x, lengths=jnp.array([1.0, 2.0]))


@pytest.mark.parametrize(
    "x,y,error,match",
    [
        (
            X[:, :, None][:, :, 0].astype(np.int64),
            Y,
            DTypeError,
            "floating-point x, got dtype int64",
        ),
        (X, Y.astype(np.float32) + 0.5, ConfigError, "needs integer class labels"),
        (
            X,
            np.where(Y == 1, 2, 0).astype(np.int32),
            DataError,
            r"labels in \[0, 1\], got range \[0, 2\]",
        ),
        (X, -Y.astype(np.int32), DataError, r"labels in \[0, 1\], got range \[-1, 0\]"),
        (X, Y[:, None], ShapeError, r"labels of shape \(N,\).*got \(20, 1\)"),
        (X, Y[:10], ShapeError, "expected y with 20 rows like x, got y of shape"),
        (np.where(X > 1, np.nan, X), Y, DataError, r"x must be finite, found \d+ NaN/inf"),
        (np.where(X > 1, np.inf, X), Y, DataError, "x must be finite"),
        (X[:0], Y[:0], DataError, "expected at least one example"),
    ],
)
def test_fit_rejects_bad_data(x, y, error, match):
    with pytest.raises(error, match=match):
        _fit(x=x, y=y)


def test_fit_rejects_labels_beyond_the_model_classes():
    with pytest.raises(DataError, match=r"labels in \[0, 2\], got range \[0, 3\]"):
        _fit(models.mlp([3]), y=np.arange(20, dtype=np.int32) % 4)


def test_fit_rejects_nan_regression_targets():
    y = np.where(X[:, 0] > 0, np.nan, 1.0).astype(np.float32)
    with pytest.raises(DataError, match="regression targets must be finite"):
        _fit(models.linear_regression(), y=y)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(optimizer="adamax9"),
            UnknownNameError,
            "unknown optimizer 'adamax9'; expected one of",
        ),
        (dict(loss="cross_entropyy"), UnknownNameError, "unknown loss 'cross_entropyy'"),
        (dict(batch_size=0), ConfigError, "batch_size to be a positive int, got 0"),
        (dict(learning_rate=-1.0), ConfigError, r"learning_rate in \(0.0, inf\), got -1.0"),
        (dict(batch_size=64, drop_remainder=True), ConfigError, "batch_size 64 > 20 examples"),
        (dict(validation=1.5), ConfigError, r"validation fraction in \(0.0, 1.0\), got 1.5"),
    ],
)
def test_fit_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        _fit(**kwargs)


def test_divergence_is_a_training_error():
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) in step \d+ \(epoch 0\)"):
        _fit(models.linear_regression(), y=1e30 * X[:, 0], optimizer="sgd", learning_rate=1e10)


@pytest.mark.parametrize(
    "build,error,match",
    [
        (
            lambda: models.mlp([8, 3], activation="relux"),
            UnknownNameError,
            "unknown activation 'relux'",
        ),
        (lambda: models.rnn("transformer", 4), UnknownNameError, "unknown rnn cell 'transformer'"),
        (
            lambda: models.from_spec({"family": "forest"}),
            UnknownNameError,
            "unknown model family 'forest'",
        ),
        (
            lambda: models.from_spec({"family": "mlp", "depth": 3}),
            ConfigError,
            "does not fit family 'mlp'",
        ),
        (lambda: models.svm(3, C=0.0), ConfigError, "C > 0, got 0.0"),
        (lambda: models.svm(3, loss="log"), ConfigError, "'hinge' or 'squared_hinge', got 'log'"),
        (lambda: models.logistic_regression(1), ConfigError, "num_classes >= 2, got 1"),
        (lambda: models.mlp([8, 0]), ConfigError, "every width to be a positive int, got 0"),
        (
            lambda: models.mlp([8, 3], dropout=1.0),
            ConfigError,
            r"dropout rate in \[0.0, 1.0\), got 1.0",
        ),
        (lambda: models.cnn([{"type": "attention"}]), UnknownNameError, "unknown cnn layer type"),
        (
            lambda: fml.data.load("imagenet_offline"),
            UnknownNameError,
            "unknown data set 'imagenet_offline'",
        ),
        (
            lambda: fml.data.load("iris", validation=1.0),
            ConfigError,
            r"validation fraction in \[0.0, 1.0\)",
        ),
    ],
)
def test_unknown_names_and_bad_hyperparameters(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_every_fml_error_is_also_a_builtin():
    assert issubclass(ShapeError, ValueError) and issubclass(DTypeError, TypeError)
    assert issubclass(UnknownNameError, ValueError) and issubclass(DataError, FmlError)


def test_cli_reports_fml_errors_without_a_traceback(capsys, monkeypatch):
    from fml import experiment

    def broken_evaluate_run(*args, **kwargs):
        raise DataError("expected at least one example, got 0")

    monkeypatch.setattr(experiment, "evaluate_run", broken_evaluate_run)
    assert main(["eval", "runs/none"]) == 2
    assert "fml: error: expected at least one example" in capsys.readouterr().err
