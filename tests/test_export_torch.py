"""PyTorch export: every family and variant matches fml's apply through standard torch
layers, the state dict round-trips bit-exactly, files reload without unpickling code,
ONNX matches in onnxruntime, and bad inputs fail with errors naming the problem."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fml import cli, models
from fml.errors import CheckpointError, ExportError
from fml.export import export
from fml.export import torch as fml_torch
from fml.models import avg_pool, cnn, conv, dense, dropout, flatten, max_pool
from fml.rundir import load_run, save_run

# (id, model, input_shape): every family and variant the issue lists.
CASES = [
    ("linear_regression", models.linear_regression(3), (5,)),
    ("logistic_sigmoid", models.logistic_regression(2), (4,)),
    ("logistic_softmax", models.logistic_regression(2, binary="softmax"), (4,)),
    ("logistic_multinomial", models.logistic_regression(4), (2, 3)),
    ("svm_binary", models.svm(2), (6,)),
    ("svm_ovr", models.svm(3, loss="squared_hinge"), (6,)),
    ("mlp", models.mlp([16, 8, 3], dropout=0.2), (7,)),
    (
        "cnn1d_valid_max",
        cnn(
            [
                conv(4, 3, padding="VALID"),
                max_pool(2),
                max_pool(3, stride=1, padding="SAME"),
                dense(8),
            ],
            3,
        ),
        (12, 2),
    ),
    ("cnn1d_same_strided_avg", cnn([conv(4, 4, stride=2), avg_pool(2), conv(3, 3)], 2), (11, 2)),
    (
        "cnn2d_valid_max",
        cnn([conv(4, 3, padding="VALID"), max_pool(2), dense(8, activation="tanh")], 3),
        (9, 8, 3),
    ),
    (
        "cnn2d_same_strided",
        cnn([conv(4, 3, stride=2), conv(5, (3, 2), stride=(2, 1))], 3),
        (8, 8, 2),
    ),
    (
        "cnn2d_int_padding_avg",
        cnn(
            [
                conv(4, 3, padding=1),
                avg_pool(2),
                conv(4, 2, padding=[(0, 2), (1, 0)]),
                flatten(),
                dropout(0.3),
            ],
            2,
        ),
        (6, 6, 1),
    ),
    (
        "cnn2d_same_pools",
        cnn(
            [
                conv(3, 3, activation="gelu"),
                max_pool(3, stride=2, padding="SAME"),
                avg_pool(3, stride=2, padding="SAME"),
                avg_pool(3, stride=1, padding=1),
            ],
            2,
        ),
        (8, 10, 2),
    ),
    ("rnn_simple", models.rnn("simple", 5, num_classes=3), (6, 2)),
    ("lstm", models.rnn("lstm", 5, num_classes=3), (6, 2)),
    ("gru", models.rnn("gru", 5, num_classes=3), (6, 2)),
    ("lstm_2layer_bidirectional", models.rnn("lstm", 4, layers=2, bidirectional=True), (5, 3)),
    (
        "gru_bidirectional_sequences",
        models.rnn("gru", 4, bidirectional=True, return_sequences=True, num_classes=2),
        (5, 3),
    ),
    ("simple_2layer_sequences", models.rnn("simple", 4, layers=2, return_sequences=True), (5, 3)),
]
IDS = [c[0] for c in CASES]
TOLERANCE = 1e-5


def random_params(model, input_shape, seed=0):
    """Random params of the model's shapes, biases nonzero too (numpy: no compiles)."""
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.3
        return jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32)

    return jax.tree.map(draw, fml_torch.param_shapes(model, input_shape))


def fml_forward(model, params, x, **kwargs):
    return np.asarray(jax.jit(model.apply)(params, x, **kwargs))


def probe(input_shape, batch=5, seed=2):
    return np.random.default_rng(seed).normal(size=(batch, *input_shape)).astype(np.float32)


def torch_forward(net, x, **kwargs):
    with torch.no_grad():
        return net(torch.from_numpy(x), **kwargs).numpy()


def max_diff(a, b):
    assert a.shape == b.shape
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def diffs():
    """Largest diff per target, printed at the end of the module (for the report)."""
    seen = {}
    yield seen
    print("\nlargest max abs diff per target:", {k: f"{v:.2e}" for k, v in seen.items()})


def _note(diffs, target, value):
    diffs[target] = max(diffs.get(target, 0.0), value)


@pytest.mark.parametrize("name,model,input_shape", CASES, ids=IDS)
def test_torch_matches_fml_and_round_trips(name, model, input_shape, diffs):
    params = random_params(model, input_shape)
    x = probe(input_shape)
    state_dict = fml_torch.to_state_dict(model, params, input_shape)
    net = fml_torch.torch_module(model, input_shape)
    net.load_state_dict(state_dict, strict=True)
    diff = max_diff(torch_forward(net, x), fml_forward(model, params, x))
    _note(diffs, "torch", diff)
    assert diff <= TOLERANCE, name

    back = fml_torch.from_state_dict(model, net.state_dict(), input_shape)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "name", ["lstm", "gru", "lstm_2layer_bidirectional", "gru_bidirectional_sequences"]
)
def test_rnn_lengths_match_packed_sequences(name, diffs):
    _, model, input_shape = CASES[IDS.index(name)]
    params = random_params(model, input_shape)
    x = probe(input_shape, batch=4)
    lengths = np.array([5, 1, 3, 4])
    net = fml_torch.torch_module(model, input_shape)
    net.load_state_dict(fml_torch.to_state_dict(model, params, input_shape))
    got = torch_forward(net, x, lengths=torch.from_numpy(lengths))
    diff = max_diff(got, fml_forward(model, params, x, lengths=jnp.asarray(lengths)))
    _note(diffs, "torch (with lengths)", diff)
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "activation",
    ["relu", "tanh", "sigmoid", "gelu", "elu", "leaky_relu", "silu", "softplus", "linear"],
)
def test_every_activation(activation, diffs):
    model = models.mlp([6, 2], activation=activation)
    params = random_params(model, (3,))
    x = 4 * probe((3,))
    net = fml_torch.torch_module(model, (3,))
    net.load_state_dict(fml_torch.to_state_dict(model, params, (3,)))
    diff = max_diff(torch_forward(net, x), fml_forward(model, params, x))
    _note(diffs, "torch", diff)
    assert diff <= TOLERANCE


def test_flatten_reorder_is_needed():
    """The NHWC -> NCHW row reorder is what makes the CNN match: a plain transpose is off."""
    _, model, input_shape = CASES[IDS.index("cnn2d_valid_max")]
    params = random_params(model, input_shape)
    state_dict = fml_torch.to_state_dict(model, params, input_shape)
    state_dict["dense_2.weight"] = torch.from_numpy(np.asarray(params["dense_2"]["w"]).T.copy())
    net = fml_torch.torch_module(model, input_shape)
    net.load_state_dict(state_dict)
    x = probe(input_shape)
    assert max_diff(torch_forward(net, x), fml_forward(model, params, x)) > 0.1


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_reload_bit_exact(tmp_path, suffix):
    _, model, input_shape = CASES[IDS.index("lstm_2layer_bidirectional")]
    params = random_params(model, input_shape)
    state_dict = fml_torch.to_state_dict(model, params, input_shape)
    path = tmp_path / f"model{suffix}"
    fml_torch.save_state_dict(state_dict, path)
    loaded = fml_torch.load_state_dict(path)
    assert sorted(loaded) == sorted(state_dict)
    back = fml_torch.from_state_dict(model, loaded, input_shape)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pt_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "f": print}, path)
    with pytest.raises(CheckpointError, match="cannot read a state dict"):
        fml_torch.load_state_dict(path)


def _state_dict(name):
    _, model, input_shape = CASES[IDS.index(name)]
    params = random_params(model, input_shape)
    return model, input_shape, fml_torch.to_state_dict(model, params, input_shape)


def test_import_missing_key():
    model, input_shape, sd = _state_dict("mlp")
    del sd["dense_1.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'dense_1.bias'.*expected keys"):
        fml_torch.from_state_dict(model, sd, input_shape)


def test_import_extra_key():
    model, input_shape, sd = _state_dict("gru")
    sd["rnn.weight_ih_l1"] = torch.zeros(15, 5)
    with pytest.raises(CheckpointError, match=r"unexpected key 'rnn.weight_ih_l1'"):
        fml_torch.from_state_dict(model, sd, input_shape)


def test_import_wrong_shape():
    model, input_shape, sd = _state_dict("cnn2d_valid_max")
    sd["dense_2.weight"] = sd["dense_2.weight"].T
    with pytest.raises(
        CheckpointError, match=r"'dense_2.weight': expected shape \(8, 36\), got \(36, 8\)"
    ):
        fml_torch.from_state_dict(model, sd, input_shape)


def test_import_integer_tensor():
    model, input_shape, sd = _state_dict("svm_ovr")
    sd["dense.bias"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"'dense.bias': expected a float tensor, got dtype"):
        fml_torch.from_state_dict(model, sd, input_shape)


def test_layer_torch_cannot_express():
    model, _, _ = _state_dict("cnn2d_valid_max")
    spec = {**model.spec, "layer_specs": [*model.spec["layer_specs"][:1], {"type": "attention"}]}
    odd = models.Model(model.init, model.apply, spec)
    with pytest.raises(ExportError, match=r"layer 1 of type 'attention' cannot be exported"):
        fml_torch.torch_module(odd, (9, 8, 3))
    with pytest.raises(ExportError, match=r"family 'transformer'"):
        fml_torch.to_state_dict(models.Model(None, None, {"family": "transformer"}), {}, (3,))


@pytest.mark.parametrize("name", ["cnn2d_same_pools", "lstm_2layer_bidirectional", "mlp"])
def test_onnx_matches_fml_with_dynamic_batch(name, tmp_path, diffs):
    """Verified at export on a batch of 4; then a batch of 3 (and 9 steps for RNNs)."""
    import onnxruntime

    _, model, input_shape = CASES[IDS.index(name)]
    params = random_params(model, input_shape)
    result = export(model, params, tmp_path / "m.onnx", to="onnx", input_shape=input_shape)
    shape = (9, *input_shape[1:]) if model.family == "rnn" else input_shape
    x = probe(shape, batch=3)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"x": x})
    diff = max(result.max_abs_diff, max_diff(got, fml_forward(model, params, x)))
    _note(diffs, "onnx", diff)
    assert diff <= 1e-4


def _write_run(tmp_path, name):
    _, model, input_shape = CASES[IDS.index(name)]
    params = random_params(model, input_shape)
    config = {"family": model.family, "input_shape": list(input_shape)}
    return save_run(tmp_path / "run", model=model, params=params, config=config), params


def test_cli_exports_a_run_dir(tmp_path, capsys):
    run_dir, params = _write_run(tmp_path, "cnn1d_same_strided_avg")
    assert cli.main(["export", str(run_dir), "--to", "safetensors"]) == 0
    assert re.search(
        r"max abs diff vs fml on a probe batch \S+ \(tolerance", capsys.readouterr().out
    )
    path = run_dir / "export" / "model.safetensors"
    model, _, config = load_run(run_dir)
    back = fml_torch.from_state_dict(
        model, fml_torch.load_state_dict(path), tuple(config["input_shape"])
    )
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    out = tmp_path / "elsewhere" / "weights.pt"
    assert cli.main(["export", str(run_dir), "--to", "torch", "--out", str(out)]) == 0
    assert sorted(fml_torch.load_state_dict(out)) == sorted(fml_torch.load_state_dict(path))


def test_cli_reports_a_missing_run_dir(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), "--to", "torch"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    _, model, input_shape = CASES[IDS.index("svm_ovr")]
    params = random_params(model, input_shape)
    path = tmp_path / "model.pt"
    path.write_bytes(b"an earlier export")
    monkeypatch.setattr(fml_torch, "run_file", lambda *a: np.zeros((4, 3), np.float32))
    with pytest.raises(ExportError, match=r"torch export of svm does not reproduce fml"):
        export(model, params, path, to="torch", input_shape=input_shape)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_cnn_flatten_dense_flatten_dense():
    """Only the first dense after a spatial input has its rows reordered; large inputs
    check softplus where exp overflows."""
    model = cnn([conv(3, 2, activation="softplus"), flatten(), dense(5), flatten(), dense(4)], 2)
    input_shape = (4, 5, 2)
    params = random_params(model, input_shape)
    x = 60 * probe(input_shape)
    net = fml_torch.torch_module(model, input_shape)
    net.load_state_dict(fml_torch.to_state_dict(model, params, input_shape), strict=True)
    want = fml_forward(model, params, x)
    assert max_diff(torch_forward(net, x), want) <= TOLERANCE * max(1.0, np.abs(want).max())
