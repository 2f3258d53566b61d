"""The plain-PyTorch references: the paper's ConvBase equals fml's strided CNN
given the same weights, and the reference trainer learns."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import fml
from experiments import torch_reference
from fml.models import presets


def test_conv_base_is_fmls_paper_cnn_with_the_same_weights():
    torch_reference.seeded(0)
    reference = torch_reference.conv_base().eval()
    model = presets.mnist1d_conv_base(10, init="torch")
    params = {}
    for i, conv in enumerate((reference.conv1, reference.conv2, reference.conv3)):
        params[f"conv_{i}"] = {
            "w": jnp.asarray(conv.weight.detach().numpy().transpose(2, 1, 0)),  # OIW -> WIO
            "b": jnp.asarray(conv.bias.detach().numpy()),
        }
    w = reference.linear.weight.detach().numpy()  # [10, C * W], channels-first flatten
    rows = w.reshape(10, 25, 5).transpose(2, 1, 0).reshape(125, 10)  # -> [W * C, 10]
    params["dense_3"] = {"w": jnp.asarray(rows), "b": jnp.asarray(reference.linear.bias.detach())}
    fresh = model.init(jax.random.key(0), (40, 1))
    assert {k: {n: v.shape for n, v in p.items()} for k, p in fresh.items()} == {
        k: {n: v.shape for n, v in p.items()} for k, p in params.items()
    }
    x = np.random.default_rng(0).standard_normal((8, 40, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.as_tensor(x[..., 0])).numpy()
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-4, atol=1e-5)


def test_reference_trainer_learns_mnist1d():
    data = fml.data.load("mnist1d")
    torch_reference.seeded(0)
    accuracy = torch_reference.train(
        torch_reference.conv_base(),
        data,
        learning_rate=1e-2,
        batch_size=100,
        steps=300,
        shuffle=False,
    )
    assert 0.4 < accuracy <= 1.0  # 300 of the notebook's 8000 steps; chance is 0.1
