"""Every family: shapes with and without jit, gradients, pinned weights against an
independent reference (numpy or torch), from_spec, and the RNN scan against a loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from fml import layers, models
from fml.models import avg_pool, cnn, conv, dense, dropout, max_pool, presets


def t(a):
    return torch.tensor(np.asarray(a))


def _random_params(params, seed=0):
    """Replaces every leaf with N(0, 0.5²) values so biases are non-zero too."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape), p.dtype), params)


# ------------------------------------------------------------ numpy references


def _np_dense_stack(params, names, x, hidden_act):
    h = x.reshape(len(x), -1).astype(np.float64)
    for i, name in enumerate(names):
        h = h @ np.asarray(params[name]["w"], np.float64) + np.asarray(
            params[name]["b"], np.float64
        )
        if i < len(names) - 1:
            h = hidden_act(h)
    return h


def _ref_linear(params, x):
    return _np_dense_stack(params, ["dense"], x, None)


def _ref_mlp_tanh(params, x):
    return _np_dense_stack(params, ["dense_0", "dense_1", "dense_2"], x, np.tanh)


# ------------------------------------------------------------ torch references


def _torch_conv(params, dims, stride=1, padding=0):
    w = t(params["w"])
    w = w.permute(w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))
    module = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(
        w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding
    )
    module.weight.data, module.bias.data = w, t(params["b"])
    return module


class _ChannelsLastFlatten(torch.nn.Module):
    """Flattens NCHW in NHWC order, as fml does."""

    def forward(self, x):
        return x.permute(0, *range(2, x.ndim), 1).reshape(x.shape[0], -1)


def _torch_linear(params):
    module = torch.nn.Linear(*params["w"].shape)
    module.weight.data, module.bias.data = t(params["w"]).T.contiguous(), t(params["b"])
    return module


def _ref_cnn2d(params, x):
    """conv(4, 3, SAME) relu -> max_pool 2 -> conv(6, 3, VALID, stride 2) relu -> avg_pool 2
    -> dense 8 relu -> dense 5."""
    net = torch.nn.Sequential(
        _torch_conv(params["conv_0"], 2, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        _torch_conv(params["conv_2"], 2, stride=2),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        _ChannelsLastFlatten(),
        _torch_linear(params["dense_4"]),
        torch.nn.ReLU(),
        _torch_linear(params["dense_5"]),
    )
    return net(t(x).permute(0, 3, 1, 2)).detach().numpy()


def _ref_cnn1d(params, x):
    """conv(4, 5, padding 2) relu -> max_pool 2 -> dropout -> dense 3."""
    net = torch.nn.Sequential(
        _torch_conv(params["conv_0"], 1, padding=2),
        torch.nn.ReLU(),
        torch.nn.MaxPool1d(2),
        _ChannelsLastFlatten(),
        _torch_linear(params["dense_3"]),
    )
    return net.eval()(t(x).permute(0, 2, 1)).detach().numpy()


_TORCH_RNN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "simple": torch.nn.RNN}


def _torch_rnn(spec, params, in_features):
    module = _TORCH_RNN[spec["cell"]](
        in_features,
        spec["hidden"],
        num_layers=spec["layers"],
        batch_first=True,
        bidirectional=spec["bidirectional"],
    )
    state = {}
    for layer_name, weights in params.items():
        if layer_name == "head":
            continue
        layer, _, reverse = layer_name.partition("_")
        for name, value in weights.items():
            state[f"{name}_{layer}" + ("_reverse" if reverse else "")] = t(value)
    module.load_state_dict(state, strict=True)
    return module


def _ref_rnn(spec):
    def reference(params, x, lengths=None):
        module = _torch_rnn(spec, params, x.shape[-1])
        inputs = t(x)
        if lengths is not None:
            inputs = torch.nn.utils.rnn.pack_padded_sequence(
                inputs, torch.tensor(lengths), batch_first=True, enforce_sorted=False
            )
        out, h_n = module(inputs)
        if spec["cell"] == "lstm":
            h_n = h_n[0]
        if lengths is not None:
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=x.shape[1]
            )
        directions = 2 if spec["bidirectional"] else 1
        y = out if spec["return_sequences"] else torch.cat(list(h_n[-directions:]), dim=-1)
        y = y.detach().numpy()
        if spec["num_classes"]:
            y = y @ np.asarray(params["head"]["w"]) + np.asarray(params["head"]["b"])
        return y

    return reference


# ------------------------------------------------------------ the cases

CASES = {
    "linear_regression": (models.linear_regression(2), (6,), _ref_linear),
    "logistic_binary": (models.logistic_regression(2), (3, 2), _ref_linear),
    "logistic_softmax2": (models.logistic_regression(2, binary="softmax"), (6,), _ref_linear),
    "logistic_multinomial": (models.logistic_regression(4), (6,), _ref_linear),
    "svm_binary": (models.svm(2), (6,), _ref_linear),
    "svm_ovr": (models.svm(3, loss="squared_hinge", C=0.5), (6,), _ref_linear),
    "mlp": (models.mlp([7, 5, 3], activation="tanh", dropout=0.2), (2, 3), _ref_mlp_tanh),
    "cnn2d": (
        cnn(
            [conv(4, 3), max_pool(2), conv(6, 3, stride=2, padding="VALID"), avg_pool(2), dense(8)],
            num_classes=5,
        ),
        (12, 12, 2),
        _ref_cnn2d,
    ),
    "cnn1d": (
        cnn([conv(4, 5, padding=2), max_pool(2), dropout(0.5)], num_classes=3),
        (10, 2),
        _ref_cnn1d,
    ),
}
for _cell in ("lstm", "gru", "simple"):
    _m = models.rnn(_cell, 5, num_classes=3)
    CASES[f"rnn_{_cell}"] = (_m, (7, 3), _ref_rnn(_m.spec))
_m = models.rnn("lstm", 4, layers=2, bidirectional=True, return_sequences=True, num_classes=3)
CASES["rnn_lstm_2layer_bidir_seq"] = (_m, (6, 3), _ref_rnn(_m.spec))
_m = models.rnn("gru", 4, layers=2, bidirectional=True)
CASES["rnn_gru_2layer_bidir"] = (_m, (6, 2), _ref_rnn(_m.spec))


def _setup(name, batch=3, seed=0):
    model, input_shape, reference = CASES[name]
    params = _random_params(model.init(jax.random.key(seed), input_shape), seed)
    # Its own generator: a shared one would draw different inputs under each xdist schedule.
    x = np.random.default_rng(seed + 1).normal(size=(batch, *input_shape)).astype(np.float32)
    return model, params, x, reference


@pytest.mark.parametrize("name", CASES)
def test_matches_independent_reference(name):
    model, params, x, reference = _setup(name)
    got = model.apply(params, x)
    want = reference(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_shapes_with_and_without_jit(name):
    model, params, x, _ = _setup(name, batch=5)
    eager = model.apply(params, x)
    jitted = jax.jit(model.apply)(params, x)
    assert eager.shape == jitted.shape and eager.shape[0] == 5
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    train_out = model.apply(params, x, key=jax.random.key(1), train=True)
    assert train_out.shape == eager.shape


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_finite_differences(name):
    model, params, x, _ = _setup(name, batch=2)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        loss = jax.jit(lambda p: jnp.sum(jnp.sin(model.apply(p, x64))))
        # A step of 1e-6 in float64: 1e-4 crossed a relu or max-pool kink for 2 of 12 seeds.
        check_grads(loss, (params64,), order=1, modes=("rev",), atol=1e-4, rtol=1e-4, eps=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_from_spec_rebuilds_identical_model(name):
    model, params, x, _ = _setup(name)
    rebuilt = models.from_spec(json.loads(json.dumps(model.spec)))
    assert rebuilt.spec == models.from_spec(model.spec).spec
    np.testing.assert_array_equal(rebuilt.apply(params, x), model.apply(params, x))
    fresh = rebuilt.init(jax.random.key(0), x.shape[1:])
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)


def test_presets_build_seed_architectures():
    mnist = presets.mnist_cnn()
    p = mnist.init(jax.random.key(0), (28, 28, 1))
    assert p["conv_0"]["w"].shape == (3, 3, 1, 32) and p["dense_2"]["w"].shape == (
        13 * 13 * 32,
        128,
    )
    cifar = presets.cifar_cnn()
    p = cifar.init(jax.random.key(0), (32, 32, 3))
    assert p["conv_0"]["w"].shape == (3, 3, 3, 32) and p["conv_2"]["w"].shape == (3, 3, 32, 64)
    assert p["dense_4"]["w"].shape == (8 * 8 * 64, 128) and p["dense_5"]["w"].shape == (128, 10)
    assert cifar.apply(p, jnp.zeros((2, 32, 32, 3))).shape == (2, 10)


def test_mlp_dropout_changes_training_output_only():
    model, params, x, _ = _setup("mlp")
    a = model.apply(params, x, key=jax.random.key(1), train=True)
    b = model.apply(params, x, key=jax.random.key(2), train=True)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x, train=False))


# ------------------------------------------------------------ RNN specifics


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple"])
def test_scan_equals_python_loop(cell):
    cell_fn = layers.get_cell(cell)
    params = _random_params(layers.cell_init(jax.random.key(0), cell_fn.gates, 3, 4))
    x = np.random.default_rng(1).normal(size=(2, 9, 3)).astype(np.float32)
    for reverse in (False, True):
        carry, h = layers.scan_rnn(cell_fn, params, x, reverse=reverse)
        loop_carry = cell_fn.zero_carry(2, 4, jnp.float32)
        outputs = [None] * 9
        for step in reversed(range(9)) if reverse else range(9):
            gx = layers.project(params, x[:, step], cell_fn.gates)
            loop_carry, outputs[step] = cell_fn.step(params, loop_carry, gx)
        np.testing.assert_allclose(h, jnp.stack(outputs, 1), atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry, loop_carry)


@pytest.mark.parametrize(
    "name", ["rnn_lstm_2layer_bidir_seq", "rnn_gru_2layer_bidir", "rnn_simple"]
)
def test_sequence_lengths_match_torch_packed_sequences(name):
    model, params, x, reference = _setup(name, batch=4)
    lengths = np.array([x.shape[1], 2, 5, 1], np.int32)
    got = model.apply(params, x, lengths=lengths)
    np.testing.assert_allclose(got, reference(params, x, lengths), atol=1e-5)


def test_lengths_ignore_padding_values():
    model, params, x, _ = _setup("rnn_gru_2layer_bidir", batch=2)
    lengths = np.array([3, 6], np.int32)
    noisy = x.copy()
    noisy[0, 3:] = 100.0
    np.testing.assert_allclose(
        model.apply(params, x, lengths=lengths),
        model.apply(params, noisy, lengths=lengths),
        atol=1e-6,
    )


@pytest.mark.parametrize("name", CASES)
def test_train_step_compiles_once(name):
    from fml import train

    model, params, x, _ = _setup(name, batch=4)
    objective = train.make_objective(
        model, None, "regression" if name == "linear_regression" else "classification"
    )
    tx = train.make_optimizer("adam", 1e-3)
    state = train.init_state(model, tx, x.shape[1:])
    step = jax.jit(train.make_train_step(model, objective, tx), donate_argnums=0)
    out = jax.eval_shape(model.apply, state.params, x)
    if objective.classify:
        y = np.zeros(out.shape[:-1] if out.shape[-1] > 1 else out.shape[:1], np.int32)
    else:
        y = np.zeros(out.shape, np.float32)
    for _ in range(3):
        state, metrics = step(state, {"x": x, "y": y, "mask": np.ones(4, np.float32)})
    assert step._cache_size() == 1 and int(state.step) == 3
    assert np.isfinite(float(metrics["loss"]))
