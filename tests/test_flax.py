"""Flax modules as fml models (`fml.models.from_flax`): a Linen CNN and an NNX MLP
train with fit, sweep and data parallelism, checkpoint, restore and export, and
every output is compared with the module's own forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import fml
from fml.errors import CheckpointError, ConfigError, ExportError
from fml.export import export


class CNN(nn.Module):
    """A small Linen CNN for 8x8x1 digits, with dropout behind a `train` flag."""

    features: int = 8
    classes: int = 10
    rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class MLP(nnx.Module):
    """A small NNX MLP with dropout (train/eval mode from fml's train flag)."""

    def __init__(self, din: int, hidden: int, dout: int, rate: float, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, hidden, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.hidden(x))))


class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))


def _digits(n=512):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return x[:n].reshape(-1, 8, 8, 1), y[:n].astype(np.int32), x[n:].reshape(-1, 8, 8, 1), y[n:]


def test_linen_model_is_the_modules_init_and_apply():
    module = CNN()
    model = fml.models.from_flax(module)
    assert model.spec == {
        "family": "flax",
        "api": "linen",
        "module": f"{__name__}:CNN",
        "kwargs": {"features": 8, "classes": 10, "rate": 0.25},
    }
    key = jax.random.key(3)
    params = model.init(key, (8, 8, 1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8, 8, 1)), jnp.float32)
    want = module.apply({"params": params}, x)
    np.testing.assert_array_equal(model.apply(params, x), want)
    # dropout: the key reaches the "dropout" stream, train=True switches it on
    drop_key = jax.random.key(7)
    train_out = model.apply(params, x, key=drop_key, train=True)
    np.testing.assert_array_equal(
        train_out, module.apply({"params": params}, x, train=True, rngs={"dropout": drop_key})
    )
    assert float(jnp.max(jnp.abs(train_out - want))) > 1e-3


def test_linen_cnn_trains_checkpoints_restores_and_exports(tmp_path):
    x, y, x_test, y_test = _digits()
    model = fml.models.from_flax(CNN())
    run = tmp_path / "run"
    state, history = fml.fit(
        model,
        (x, y),
        epochs=8,
        batch_size=32,
        learning_rate=1e-2,
        quiet=True,
        checkpoint_dir=run,
    )
    accuracy = float(np.mean(np.argmax(fml.predict(model, state.params, x_test), -1) == y_test))
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert accuracy > 0.85, accuracy  # a logistic regression on raw digits: ~0.9
    # restore by spec (this test module is importable) and with model=
    for kwargs in ({}, {"model": model}):
        restored_model, restored = fml.checkpoint.restore(run, **kwargs)
        assert restored_model.spec == model.spec
        assert int(restored.step) == int(state.step)
        jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    with pytest.raises(CheckpointError, match="saved spec"):
        fml.checkpoint.restore(run, model=fml.models.from_flax(CNN(features=4)))
    # outputs: fml's apply equals the module's own forward pass; the SavedModel equals it
    probe = x_test[:16]
    want = np.asarray(CNN().apply({"params": restored.params}, probe))
    np.testing.assert_allclose(fml.predict(restored_model, restored.params, probe), want, atol=1e-6)
    exported = export(
        restored_model,
        restored.params,
        tmp_path / "cnn",
        to="savedmodel",
        input_shape=(8, 8, 1),
        platforms=("cpu",),
    )
    assert exported.max_abs_diff <= 1e-5
    import tensorflow as tf

    serve = tf.saved_model.load(str(tmp_path / "cnn")).signatures["serving_default"]
    got = serve(x=tf.constant(probe))["y"].numpy()
    assert np.max(np.abs(got - want)) <= 1e-5


def test_onnx_export_of_flax_modules_equals_their_forward_pass(tmp_path):
    import onnxruntime

    x = np.random.default_rng(1).standard_normal((7, 8, 8, 1)).astype(np.float32)
    cases = {
        "cnn": (fml.models.from_flax(CNN()), (8, 8, 1), x),
        "nnx_mlp": (
            fml.models.from_flax(MLP, kwargs={"din": 64, "hidden": 16, "dout": 3, "rate": 0.5}),
            (64,),
            x.reshape(7, 64),
        ),
    }
    for name, (model, shape, probe) in cases.items():
        params = model.init(jax.random.key(0), shape)
        exported = export(model, params, tmp_path / f"{name}.onnx", to="onnx", input_shape=shape)
        assert exported.max_abs_diff <= 1e-5
        # another batch size than the export's probe: the batch is dynamic
        session = onnxruntime.InferenceSession(
            str(exported.path), providers=["CPUExecutionProvider"]
        )
        got = session.run(["y"], {"x": probe})[0]
        np.testing.assert_allclose(got, np.asarray(model.apply(params, probe)), atol=1e-5)


class Cumulative(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.cumsum(nn.Dense(3)(x), axis=1)


def test_exports_a_flax_module_cannot_take_are_clear_errors(tmp_path):
    model = fml.models.from_flax(CNN())
    params = model.init(jax.random.key(0), (8, 8, 1))
    for target in ("torch", "safetensors"):
        with pytest.raises(ExportError, match="family 'flax' cannot be exported to PyTorch"):
            export(model, params, tmp_path / f"m.{target}", to=target, input_shape=(8, 8, 1))
    model = fml.models.from_flax(Cumulative())
    params = model.init(jax.random.key(0), (4,))
    with pytest.raises(ExportError, match="'cumsum'"):
        export(model, params, tmp_path / "m.onnx", to="onnx", input_shape=(4,))
    assert not list(tmp_path.iterdir())


def test_nnx_model_trains_with_fit_sweep_and_parallel():
    x, y, _, _ = _digits(384)
    x = x.reshape(len(x), -1)
    sizes = {"din": 64, "hidden": 32, "dout": 10}
    model = fml.models.from_flax(MLP, kwargs={**sizes, "rate": 0.2})
    assert model.spec["api"] == "nnx" and model.spec["module"] == f"{__name__}:MLP"
    params = model.init(jax.random.key(0), (64,))
    # init is the module built from the key; apply is its forward pass
    params_key, dropout_key = jax.random.split(jax.random.key(0))
    built = MLP(64, 32, 10, 0.2, rngs=nnx.Rngs(params=params_key, dropout=dropout_key))
    built.eval()
    np.testing.assert_allclose(model.apply(params, x[:4]), built(x[:4]), atol=1e-6)
    settings = dict(epochs=2, batch_size=64, learning_rate=1e-2)
    state, history = fml.fit(model, (x, y), seed=1, quiet=True, **settings)
    assert history["train_loss"][-1] < history["train_loss"][0]
    # a sweep member is the fit of its seed
    result = fml.sweep(model, (x, y), seeds=[0, 1], **settings)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
        result.member_state(1).params,
        state.params,
    )
    # data parallel over the 8 CPU devices: the same training, up to rounding (without
    # dropout: each device draws its own dropout masks)
    plain = fml.models.from_flax(MLP, kwargs={**sizes, "rate": 0.0})
    single, _ = fml.fit(plain, (x, y), seed=1, quiet=True, **settings)
    parallel, _ = fml.fit(plain, (x, y), seed=1, quiet=True, parallel="shard_map", **settings)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), parallel.params, single.params
    )
    # the spec rebuilds the same model
    rebuilt = fml.models.from_spec(model.spec)
    np.testing.assert_array_equal(
        rebuilt.apply(state.params, x[:4]), model.apply(state.params, x[:4])
    )


def test_bad_flax_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="expected a flax.linen Module"):
        fml.models.from_flax(lambda x: x)
    with pytest.raises(ConfigError, match="needs kwargs="):
        fml.models.from_flax(MLP)
    with pytest.raises(ConfigError, match="batch_stats"):
        fml.models.from_flax(Normed()).init(jax.random.key(0), (3,))
    with pytest.raises(ConfigError, match="cannot import"):
        fml.models.from_spec(
            {"family": "flax", "api": "linen", "module": "no_such_pkg:M", "kwargs": {}}
        )


def test_docstring_examples():
    import doctest

    from fml.models import _flax

    result = doctest.testmod(_flax, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
