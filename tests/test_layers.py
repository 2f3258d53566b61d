"""Primitive layers against independent references: numpy and torch.nn.functional."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fml import layers
from fml.errors import ConfigError, UnknownNameError


def _torch(x_channels_last):
    """NWC/NHWC numpy -> NCW/NCHW torch."""
    x = torch.tensor(np.asarray(x_channels_last))
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def _channels_last(t):
    return t.permute(0, *range(2, t.ndim), 1).detach().numpy()


def test_dense_matches_numpy(rng):
    params = layers.dense_init(jax.random.key(0), 5, 3)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    want = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    np.testing.assert_allclose(layers.dense(params, x), want, atol=1e-6)


CONV_CASES = [
    # (spatial, kernel, stride, padding, torch padding or None for "same as fml")
    ((12,), (3,), 1, "VALID", 0),
    ((12,), (5,), 1, "SAME", 2),
    ((13,), (3,), 2, 1, 1),
    ((9, 9), (3, 3), 1, "VALID", 0),
    ((9, 9), (3, 3), 1, 1, 1),
    ((8, 8), (3, 3), 1, "SAME", 1),
]


@pytest.mark.parametrize("spatial,kernel,stride,padding,torch_padding", CONV_CASES)
def test_conv_matches_torch(spatial, kernel, stride, padding, torch_padding, rng):
    params = layers.conv_init(jax.random.key(1), 3, 4, kernel)
    params["b"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    x = rng.normal(size=(2, *spatial, 3)).astype(np.float32)
    got = layers.conv(params, x, stride=stride, padding=padding)
    w = torch.tensor(np.asarray(params["w"]))
    w = w.permute(w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))  # [*k, in, out] -> [out, in, *k]
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    want = conv(_torch(x), w, torch.tensor(np.asarray(params["b"])), stride, torch_padding)
    np.testing.assert_allclose(got, _channels_last(want), atol=1e-5)


@pytest.mark.parametrize("platform", layers.PLATFORM_PATHS)  # im2col (CPU), native
@pytest.mark.parametrize("in_channels", [1, 8])  # both im2col weight-gradient paths
@pytest.mark.parametrize("spatial,kernel,stride,padding,torch_padding", CONV_CASES)
def test_conv_gradients_match_torch(
    platform, in_channels, spatial, kernel, stride, padding, torch_padding, rng
):
    params = layers.conv_init(jax.random.key(1), in_channels, 4, kernel)
    x = rng.normal(size=(2, *spatial, in_channels)).astype(np.float32)
    out = layers.conv(params, x, stride=stride, padding=padding)
    cotangent = rng.normal(size=out.shape).astype(np.float32)

    def loss(params, x):
        y = layers.conv(params, x, stride=stride, padding=padding, platform=platform)
        return jnp.sum(y * cotangent)

    grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    w = torch.tensor(np.asarray(params["w"]))
    w = w.permute(w.ndim - 1, w.ndim - 2, *range(w.ndim - 2)).requires_grad_()
    b = torch.tensor(np.asarray(params["b"]), requires_grad=True)
    x_t = _torch(x).requires_grad_()
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    want = conv(x_t, w, b, stride, torch_padding)
    want.backward(_torch(cotangent))
    grad_w = w.grad.permute(*range(2, w.ndim), 1, 0).numpy()  # back to [*k, in, out]
    np.testing.assert_allclose(grads["w"], grad_w, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grads["b"], b.grad.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_x, _channels_last(x_t.grad), atol=2e-5, rtol=1e-5)


def test_strided_same_pads_high_like_jax(rng):
    """JAX's SAME pads (0, 1) for an even input, stride 2, kernel 3 — torch's padding=1
    would pad (1, 1); fml follows JAX, so the reference pads explicitly."""
    params = layers.conv_init(jax.random.key(2), 2, 3, (3, 3))
    x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
    got = layers.conv(params, x, stride=2, padding="SAME")
    w = torch.tensor(np.asarray(params["w"])).permute(3, 2, 0, 1)
    padded = F.pad(_torch(x), (0, 1, 0, 1))
    want = F.conv2d(padded, w, torch.tensor(np.asarray(params["b"])), 2)
    np.testing.assert_allclose(got, _channels_last(want), atol=1e-5)
    assert got.shape == (1, 4, 4, 3)


@pytest.mark.parametrize("platform", [None, *layers.PLATFORM_PATHS])
@pytest.mark.parametrize("window,stride", [(2, None), (3, 2), (2, 1)])
@pytest.mark.parametrize("dims", [1, 2])
def test_max_and_avg_pool_match_torch(window, stride, dims, platform, rng):
    x = rng.normal(size=(2, *(11,) * dims, 3)).astype(np.float32)
    ref_stride = stride or window
    for fml_pool, torch_pool in [
        (layers.max_pool, F.max_pool1d if dims == 1 else F.max_pool2d),
        (layers.avg_pool, F.avg_pool1d if dims == 1 else F.avg_pool2d),
    ]:
        got = fml_pool(x, window, stride, platform=platform)
        want = torch_pool(_torch(x), window, ref_stride)
        np.testing.assert_allclose(got, _channels_last(want), atol=1e-6)


def test_same_pooling_ignores_padding():
    x = np.arange(5, dtype=np.float32).reshape(1, 5, 1)
    np.testing.assert_allclose(layers.avg_pool(x, 2, padding="SAME")[0, :, 0], [0.5, 2.5, 4.0])
    np.testing.assert_allclose(layers.max_pool(-x, 2, padding="SAME")[0, :, 0], [0.0, -2.0, -4.0])


@pytest.mark.parametrize("platform", layers.PLATFORM_PATHS)
def test_pool_gradients_match_torch(platform, rng):
    x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    xt = _torch(x).clone().requires_grad_(True)
    for fml_pool, torch_pool in [(layers.max_pool, F.max_pool2d), (layers.avg_pool, F.avg_pool2d)]:
        grad = jax.grad(lambda x, pool=fml_pool: jnp.sum(pool(x, 3, 2, platform=platform) ** 2))(x)
        xt.grad = None
        (torch_pool(xt, 3, 2) ** 2).sum().backward()
        np.testing.assert_allclose(grad, _channels_last(xt.grad), atol=1e-5)


def test_cpu_lowering_takes_the_cpu_path_and_paths_agree(rng):
    """On CPU the dispatching conv + pool is bit-identical to the forced CPU path, and
    the native path's gradients agree with it to float32 rounding."""
    params = layers.conv_init(jax.random.key(3), 3, 8, (3, 3))
    x = rng.normal(size=(4, 10, 10, 3)).astype(np.float32)

    def loss(params, x, platform):
        y = layers.conv(params, x, padding=1, platform=platform)
        y = layers.avg_pool(layers.max_pool(y, 2, platform=platform), 2, platform=platform)
        return jnp.sum(jnp.sin(y))

    grads = {
        p: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, p)
        for p in (None, *layers.PLATFORM_PATHS)
    }
    for got, want in zip(jax.tree.leaves(grads[None]), jax.tree.leaves(grads["cpu"])):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(grads["native"]), jax.tree.leaves(grads["cpu"])):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UnknownNameError, match="platform path"):
        layers.max_pool(x, 2, platform="gpu")


def test_dropout_rate_is_drop_probability():
    x = jnp.ones((200_000,))
    y = layers.dropout(x, 0.3, key=jax.random.key(0), train=True)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.3) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted dropout keeps the expectation
    np.testing.assert_array_equal(layers.dropout(x, 0.3, train=False), x)


def test_dropout_needs_key_and_valid_rate():
    with pytest.raises(ConfigError, match="PRNG"):
        layers.dropout(jnp.ones(3), 0.5, train=True)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        layers.dropout(jnp.ones(3), 1.0, key=jax.random.key(0), train=True)


def test_layer_norm_matches_torch(rng):
    x = rng.normal(size=(4, 7)).astype(np.float32)
    params = {
        "scale": jnp.asarray(rng.normal(size=7), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=7), jnp.float32),
    }
    want = F.layer_norm(
        torch.from_numpy(x),
        (7,),
        torch.tensor(np.asarray(params["scale"])),
        torch.tensor(np.asarray(params["bias"])),
    )
    np.testing.assert_allclose(layers.layer_norm(params, x), want.numpy(), atol=1e-5)


def test_activations_match_numpy_and_reject_unknown():
    x = np.linspace(-3, 3, 13).astype(np.float32)
    np.testing.assert_allclose(layers.activation("relu")(x), np.maximum(x, 0))
    np.testing.assert_allclose(layers.activation("sigmoid")(x), 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(layers.activation(None)(x), x)
    with pytest.raises(UnknownNameError, match="'relux'.*expected one of"):
        layers.activation("relux")


def test_unknown_padding_and_cell():
    with pytest.raises(ConfigError, match="padding"):
        layers.explicit_padding("FULL", 2)
    with pytest.raises(UnknownNameError, match="rnn cell"):
        layers.get_cell("transformer")


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("platform", layers.PLATFORM_PATHS)
def test_dense_gradients_match_numpy_on_both_paths(outputs, platform, rng):
    # With one output the CPU path's weight gradient is a multiply and a reduce.
    x = rng.normal(size=(300, 7)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(7, outputs)), jnp.float32), "b": jnp.zeros(outputs)}
    cotangent = rng.normal(size=(300, outputs)).astype(np.float32)
    loss = lambda p, x: jnp.sum(layers.dense(p, x, platform=platform) * cotangent)
    grads, dx = jax.grad(loss, argnums=(0, 1))(params, x)
    x64, c64 = x.astype(np.float64), cotangent.astype(np.float64)
    np.testing.assert_allclose(grads["w"], x64.T @ c64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grads["b"], c64.sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, c64 @ np.asarray(params["w"], np.float64).T, atol=1e-5)


def test_few_output_dense_gradient_is_a_matmul_off_cpu():
    """Lowered for cuda and tpu the weight gradient of a one-output layer stays
    XLA's matmul; on CPU it is a reduce over the rows (`one_output_matmul`)."""
    params = {"w": jnp.zeros((100, 1)), "b": jnp.zeros(1)}
    x = jnp.zeros((512, 100))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(layers.dense(p, x))))

    def counts(platform):
        text = jax.export.export(grad, platforms=(platform,))(params).mlir_module()
        return text.count("stablehlo.dot_general"), text.count("stablehlo.reduce")

    assert counts("cpu")[0] == 0  # forward only needs no dot: the loss is a plain sum
    assert counts("cpu")[1] >= 2  # the weight gradient's reduce, and the bias's
    for platform in ("cuda", "tpu"):
        dots, reduces = counts(platform)
        assert dots == 1 and reduces == 1  # the weight gradient's matmul; the bias's sum
