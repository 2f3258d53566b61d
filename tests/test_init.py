"""`init="torch"`: fml's PyTorch-default initialisers against torch's own
`nn.Linear`, `nn.Conv1d`, `nn.Conv2d` and `nn.GRU` draws (bounds and moments)."""

import math

import jax
import numpy as np
import pytest
import torch

from fml import layers, models
from fml.errors import UnknownNameError


def _moments(a):
    a = np.asarray(a, np.float64).ravel()
    return np.abs(a).max(), a.mean(), a.std()


def _check_same_distribution(ours, theirs, bound):
    """Both uniform in ±bound: max |.| just under bound, mean 0, std bound / √3
    (to five standard errors of a sample of this size)."""
    for a in (ours, theirs):
        n = np.size(a)
        top, mean, std = _moments(a)
        assert bound * (1 - 5 / n) <= top <= bound
        assert abs(mean) <= 5 * bound / math.sqrt(3 * n)
        assert abs(std - bound / math.sqrt(3)) <= 5 * 0.26 * bound / math.sqrt(n)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_dense_torch_init_matches_nn_linear():
    linear = torch.nn.Linear(400, 300)
    params = layers.dense_init(jax.random.key(0), 400, 300, init="torch")
    bound = 1 / math.sqrt(400)
    _check_same_distribution(params["w"], linear.weight.detach().numpy(), bound)
    _check_same_distribution(params["b"], linear.bias.detach().numpy(), bound)


@pytest.mark.parametrize(
    "kernel, torch_conv",
    [((5,), lambda: torch.nn.Conv1d(25, 250, 5)), ((3, 3), lambda: torch.nn.Conv2d(32, 300, 3))],
)
def test_conv_torch_init_matches_nn_conv(kernel, torch_conv):
    module = torch_conv()
    params = layers.conv_init(
        jax.random.key(1), module.in_channels, module.out_channels, kernel, init="torch"
    )
    assert params["w"].shape == (*kernel, module.in_channels, module.out_channels)
    bound = 1 / math.sqrt(module.in_channels * math.prod(kernel))
    _check_same_distribution(params["w"], module.weight.detach().numpy(), bound)
    _check_same_distribution(params["b"], module.bias.detach().numpy(), bound)


def test_rnn_cells_and_head_match_torch_gru_and_linear():
    gru, head = torch.nn.GRU(40, 256, batch_first=True), torch.nn.Linear(256, 100)
    params = models.rnn("gru", 256, num_classes=100, init="torch").init(jax.random.key(2), (7, 40))
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        theirs = getattr(gru, f"{name}_l0").detach().numpy()
        assert params["l0"][name].shape == theirs.shape
        _check_same_distribution(params["l0"][name], theirs, 1 / math.sqrt(256))
    _check_same_distribution(params["head"]["w"], head.weight.detach().numpy(), 1 / 16)
    _check_same_distribution(params["head"]["b"], head.bias.detach().numpy(), 1 / 16)


def test_lecun_default_is_unchanged():
    params = layers.dense_init(jax.random.key(3), 400, 300)
    assert float(np.abs(params["b"]).max()) == 0.0
    # LeCun normal: truncated normal with variance 1 / fan_in.
    assert abs(float(np.std(params["w"])) - 1 / math.sqrt(400)) <= 0.02 / math.sqrt(400)


@pytest.mark.parametrize(
    "model",
    [
        models.linear_regression(init="torch"),
        models.logistic_regression(3, init="torch"),
        models.svm(2, init="torch"),
        models.mlp([16, 3], init="torch"),
        models.cnn([models.conv(4, 3)], 3, init="torch"),
        models.rnn("lstm", 8, num_classes=3, init="torch"),
    ],
    ids=lambda m: m.family,
)
def test_init_is_recorded_in_the_spec(model):
    rebuilt = models.from_spec(model.spec)
    assert rebuilt.spec["init"] == "torch"
    shape = (6, 2) if model.family == "rnn" else (6, 2) if model.family == "cnn" else (5,)
    a = model.init(jax.random.key(4), shape)
    b = rebuilt.init(jax.random.key(4), shape)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    biases = [leaf for leaf in jax.tree.leaves(a) if leaf.ndim == 1]
    assert all(float(np.abs(leaf).max()) > 0 for leaf in biases)  # torch biases are not zero


def test_unknown_init_is_named():
    with pytest.raises(UnknownNameError, match="xavier"):
        models.mlp([3], init="xavier")
