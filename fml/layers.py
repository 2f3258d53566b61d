"""Primitive pure layers: each is an `*_init` that builds a params dict and a pure
function that applies it. Inputs are batched and channels-last (`NWC`, `NHWC`).

Dense and conv weights use JAX's layouts (`w` is `[in, out]`, conv `w` is
`[*kernel, in, out]`); recurrent cells use PyTorch's fused gate layout
(`weight_ih` is `[G*H, in]`, gates LSTM i,f,g,o and GRU r,z,n), so exporting to
PyTorch is a rename.
"""

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fml.errors import ConfigError, ShapeError, unknown

# ---------------------------------------------------------------- activations

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "linear": lambda x: x,
}


def activation(name: str | None) -> Callable:
    """The activation function called `name` (`None` or "linear" is the identity)."""
    if name is None:
        return ACTIVATIONS["linear"]
    if name not in ACTIVATIONS:
        raise unknown("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------- dense


def add_bias(y, b):
    """`y + b` over the last axis, with explicit broadcasting (rank-promotion safe)."""
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


# Initialisers of dense and conv layers: fml's ("lecun": LeCun-normal weights, zero
# biases) and PyTorch's defaults ("torch": `nn.Linear`/`nn.Conv*`'s kaiming-uniform
# with a=√5, i.e. weights and biases uniform in ±1/√fan_in).
INITS = ("lecun", "torch")


def check_init(init: str) -> str:
    """`init` if it names an initialiser in `INITS`, else `ConfigError`."""
    if init not in INITS:
        raise unknown("init", init, INITS)
    return init


def _torch_uniform(key, w_shape, fan_in: int, dtype) -> dict:
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {
        "w": jax.random.uniform(k_w, w_shape, dtype, -bound, bound),
        "b": jax.random.uniform(k_b, w_shape[-1:], dtype, -bound, bound),
    }


def dense_init(
    key, in_features: int, out_features: int, dtype=jnp.float32, *, init: str = "lecun"
) -> dict:
    """`{"w": [in, out], "b": [out]}`: LeCun-normal weights and zero bias ("lecun"),
    or PyTorch's `nn.Linear` init, both uniform in ±1/√in ("torch")."""
    if check_init(init) == "torch":
        return _torch_uniform(key, (in_features, out_features), in_features, dtype)
    w = jax.nn.initializers.lecun_normal()(key, (in_features, out_features), dtype)
    return {"w": w, "b": jnp.zeros((out_features,), dtype)}


def dense(params: dict, x, *, platform: str | None = None):
    """`x @ w + b` over the last axis of `x`. With one output (a binary linear
    model) and `x` of shape `[N, D]`, its weight gradient is `one_output_matmul`'s
    on XLA:CPU (see `on_platform`; `platform` forces a path)."""
    w = params["w"]
    if x.ndim == 2 and w.shape[-1] == 1:
        y = on_platform(x, w, cpu=one_output_matmul, native=jnp.matmul, platform=platform)
    else:
        y = x @ w
    return add_bias(y, params["b"])


@jax.custom_vjp
def one_output_matmul(x, w):
    """`x @ w` for `x: [N, D]` and `w: [D, 1]`, whose weight gradient is a multiply
    and a reduce over the rows (accumulated in at least float32): XLA:CPU's
    transposed matmul `x.T @ g` with one column is several times slower (x of
    200,000 x 100 on 2 cores: 75 -> 7 ms; with 2 to 8 columns the two are level or
    the matmul is faster)."""
    return x @ w


def _one_output_forward(x, w):
    return x @ w, (x, w)


def _one_output_vjp(residuals, g):
    x, w = residuals
    g = lax.optimization_barrier(g)  # else the reduce recomputes g's producer per element
    accumulate = jnp.promote_types(w.dtype, jnp.float32)
    dw = jnp.sum(x * g, axis=0, dtype=accumulate).astype(w.dtype)
    return g @ w.T, dw[:, None]


one_output_matmul.defvjp(_one_output_forward, _one_output_vjp)


def flatten(x):
    """`[B, ...] -> [B, prod(...)]`, row-major (channels fastest for NHWC)."""
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------- conv

Padding = str | int | Sequence[tuple[int, int]]


def conv_init(
    key,
    in_channels: int,
    out_channels: int,
    kernel: Sequence[int],
    dtype=jnp.float32,
    *,
    init: str = "lecun",
):
    """`{"w": [*kernel, in, out], "b": [out]}` (WIO for 1D, HWIO for 2D): LeCun-normal
    weights and zero bias ("lecun"), or PyTorch's `nn.Conv*` init, both uniform in
    ±1/√fan_in with `fan_in = in * prod(kernel)` ("torch")."""
    shape = (*kernel, in_channels, out_channels)
    if check_init(init) == "torch":
        return _torch_uniform(key, shape, in_channels * math.prod(kernel), dtype)
    w = jax.nn.initializers.lecun_normal(in_axis=(*range(len(kernel)), -2))(key, shape, dtype)
    return {"w": w, "b": jnp.zeros((out_channels,), dtype)}


def explicit_padding(padding: Padding, ndim: int):
    """Normalises padding to "SAME", "VALID" or `ndim` (low, high) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ConfigError(f"expected padding 'SAME', 'VALID' or int, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    return [tuple(p) for p in padding]


_CONV_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def conv(
    params: dict,
    x,
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    platform: str | None = None,
):
    """Channels-last convolution; 1D or 2D is read off the rank of `params["w"]`.

    The forward pass is XLA's convolution. On XLA:CPU the gradients are those of
    the same convolution written as shifted slices and one matmul (`_conv_vjp`),
    several times faster there inside a `lax.scan` (fused epochs); on every other
    platform (cuda, rocm, tpu) they are XLA's own convolutions (cuDNN's kernels),
    chosen when the program is lowered (`on_platform`).

    Args:
      params: `{"w": [*kernel, C_in, C_out], "b": [C_out]}`.
      x: `[B, W, C_in]` (1D) or `[B, H, W, C_in]` (2D).
      stride: int or one per spatial dim.
      padding: "SAME" (JAX's convention: extra padding goes high), "VALID", an int
        applied to both sides of every spatial dim, or explicit (low, high) pairs.
      platform: None (chosen at lowering), or "cpu" / "native" to force a path.

    Returns:
      `[B, *spatial_out, C_out]`.
    """
    w = params["w"]
    ndim = w.ndim - 2
    strides = (stride,) * ndim if isinstance(stride, int) else tuple(stride)
    pads = explicit_padding(padding, ndim)
    if pads == "VALID":
        pads = [(0, 0)] * ndim
    elif pads == "SAME":
        pads = [_same_pads(n, k, s) for n, k, s in zip(x.shape[1:-1], w.shape[:-2], strides)]
    y = conv_nobias(x, w, strides, tuple(map(tuple, pads)), platform=platform)
    return add_bias(y, params["b"])


PLATFORM_PATHS = ("cpu", "native")


def on_platform(*args, cpu: Callable, native: Callable, platform: str | None = None):
    """`cpu(*args)` when the program runs on XLA:CPU, `native(*args)` on any other
    platform; the choice is made when the program is lowered for its platform
    (`lax.platform_dependent`), so one traced function serves every platform and
    a multi-platform export carries both. `platform` ("cpu" or "native") forces
    one path wherever it runs (to compare them, in tests and benchmarks)."""
    if platform is None:
        return lax.platform_dependent(*args, cpu=cpu, default=native)
    if platform not in PLATFORM_PATHS:
        raise unknown("platform path", platform, PLATFORM_PATHS)
    return (cpu if platform == "cpu" else native)(*args)


def conv_nobias(x, w, strides: tuple, pads: tuple, *, platform: str | None = None):
    """XLA's convolution of channels-last `x` with `w`, explicit `(low, high)` pads;
    its gradient is im2col on CPU and native elsewhere (see `on_platform`)."""

    def cpu(x, w):
        return _conv(x, w, strides, pads)

    def native(x, w):
        return _conv_native(x, w, strides, pads)

    return on_platform(x, w, cpu=cpu, native=native, platform=platform)


def _conv_native(x, w, strides, pads):
    dims = _CONV_DIMS[w.ndim - 2]
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dims)


def _conv_as_matmul(x, w, strides, pads):
    """The convolution as every kernel offset's strided slice, stacked on the
    channel axis (offset-major, as `w` flattens) and multiplied by `w`."""
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    patches = jnp.concatenate(list(_window_slices(x, w.shape[:-2], strides)), axis=-1)
    return patches @ w.reshape(-1, w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return _conv_native(x, w, strides, pads)


def _conv_forward(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


def _conv_vjp(strides, pads, residuals, g):
    x, w = residuals
    if x.shape[-1] > _FEW_CHANNELS:
        return jax.vjp(lambda x, w: _conv_as_matmul(x, w, strides, pads), x, w)[1](g)
    dx = jax.vjp(lambda x: _conv_as_matmul(x, w, strides, pads), x)[1](g)[0]
    return dx, _few_channel_weight_grad(x, g, w.shape, strides, pads)


# Up to this many input channels (an input layer), `_few_channel_weight_grad`
# is faster: 12 -> 2 ms for 1 channel, 7 -> 2.6 ms for 3 (28x28, batch 128, 3x3
# kernel); at 32 channels its strided copies cost more than it saves (101 -> 134 ms).
_FEW_CHANNELS = 4


def _few_channel_weight_grad(x, g, w_shape, strides, pads):
    """`dL/dw` as one `[K*C_in, N] @ [N, C_out]` matmul over the `N` output
    positions. The patches are stacked channels-first, so the long axis is
    contracted without a transposed operand (several times slower on XLA:CPU)."""
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    x_CxBx = jnp.moveaxis(x, -1, 0)
    patches = jnp.stack(list(_window_slices(x_CxBx, w_shape[:-2], strides, first_axis=2)))
    out = patches.reshape(-1, g.size // g.shape[-1]) @ g.reshape(-1, g.shape[-1])
    return out.reshape(w_shape)


_conv.defvjp(_conv_forward, _conv_vjp)


# -------------------------------------------------------------------- pooling


def _same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _window_slices(x, window, stride, first_axis: int = 1):
    """Every offset of a VALID pooling window as a strided slice of `x`, whose
    spatial axes start at `first_axis` (1 for channels-last `x`).

    Taking max/mean over these slices is much faster on XLA:CPU than
    `reduce_window`, whose max gradient dominates small CNN steps. Each is one
    `lax.slice`: under a symbolic batch (a SavedModel's) it stays a slice, where
    `x[:, a:b:s]` becomes a dynamic gather that TFLite cannot convert.
    """
    spatial = x.shape[first_axis : first_axis + len(window)]
    out = [(n - w) // s + 1 for n, w, s in zip(spatial, window, stride)]
    lead, trail = x.shape[:first_axis], x.shape[first_axis + len(window) :]
    strides = (1,) * len(lead) + tuple(stride) + (1,) * len(trail)
    for offsets in itertools.product(*(range(w) for w in window)):
        starts = (0,) * len(lead) + offsets + (0,) * len(trail)
        ends = [o + s * (n - 1) + 1 for o, s, n in zip(offsets, stride, out)]
        yield lax.slice(x, starts, (*lead, *ends, *trail), strides)


def _pool_geometry(x, window, stride, padding):
    ndim = x.ndim - 2
    window = (window,) * ndim if isinstance(window, int) else tuple(window)
    stride = window if stride is None else stride
    stride = (stride,) * ndim if isinstance(stride, int) else tuple(stride)
    padding = explicit_padding(padding, ndim)
    if padding == "VALID":
        pads = [(0, 0)] * ndim
    elif padding == "SAME":
        pads = [_same_pads(n, w, s) for n, w, s in zip(x.shape[1:-1], window, stride)]
    else:
        pads = padding
    return window, stride, [(0, 0), *pads, (0, 0)]


def max_pool(
    x, window: int | Sequence[int], stride=None, padding: Padding = "VALID", *, platform=None
):
    """Max pooling over the spatial dims of channels-last `x`; stride defaults to window.

    On XLA:CPU the max of every window offset's strided slice; elsewhere XLA's
    `reduce_window` (`platform` forces one, see `on_platform`)."""
    window, stride, pads = _pool_geometry(x, window, stride, padding)
    x = jnp.pad(x, pads, constant_values=-jnp.inf)

    def cpu(x):
        return functools.reduce(jnp.maximum, _window_slices(x, window, stride))

    def native(x):
        return _reduce_window(x, lax.max, -np.inf, window, stride)

    return on_platform(x, cpu=cpu, native=native, platform=platform)


def avg_pool(
    x, window: int | Sequence[int], stride=None, padding: Padding = "VALID", *, platform=None
):
    """Average pooling; with padding, the mean is over the real (unpadded) elements.
    Summed as `max_pool` takes its max (slices on CPU, `reduce_window` elsewhere)."""
    window, stride, pads = _pool_geometry(x, window, stride, padding)

    def cpu(x):
        return sum(_window_slices(x, window, stride))

    def native(x):
        return _reduce_window(x, lax.add, 0.0, window, stride)

    total = on_platform(jnp.pad(x, pads), cpu=cpu, native=native, platform=platform)
    ones = jnp.pad(jnp.ones((1, *x.shape[1:-1], 1), x.dtype), pads)
    count = sum(_window_slices(ones, window, stride))
    return total / count


def _reduce_window(x, op, identity: float, window, stride):
    """XLA's VALID `reduce_window` over the spatial dims of channels-last `x`; with
    `identity` the monoid's own (`-inf` for max, 0 for add), jax differentiates it."""
    ones = (1,) * (x.ndim - len(window) - 1)
    init = np.array(identity, x.dtype)
    return lax.reduce_window(x, init, op, (*ones, *window, 1), (*ones, *stride, 1), "VALID")


# ------------------------------------------------------------ dropout, norms


def dropout(x, rate: float, *, key=None, train: bool = False):
    """Zeroes each element with probability `rate` in training, scaling the rest by
    `1 / (1 - rate)`; the identity at inference. `rate` is the drop probability."""
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"expected dropout rate in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x
    if key is None:
        raise ConfigError("dropout with train=True needs a PRNG `key`")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def layer_norm_init(features: int, dtype=jnp.float32) -> dict:
    return {"scale": jnp.ones((features,), dtype), "bias": jnp.zeros((features,), dtype)}


def layer_norm(params: dict, x, eps: float = 1e-5):
    """Normalises the last axis to zero mean, unit variance, then scales and shifts."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    normed = (x - mean) * lax.rsqrt(var + eps)
    return add_bias(normed * params["scale"].reshape((1,) * (x.ndim - 1) + (-1,)), params["bias"])


# ------------------------------------------------------------ recurrent cells


class Cell(NamedTuple):
    """A recurrent cell in PyTorch's fused layout.

    `step(params, carry, gx) -> (carry, h_BxH)` is the recurrent half of a step:
    `gx` is the input half of each gate, a tuple of `gates` arrays `[B, H]`
    (`project` computes them for every step at once, hoisted out of the scan).
    Separate per-gate arrays, not one `[B, G*H]` array sliced in the loop, make
    the step's elementwise work 4x faster on XLA:CPU.
    """

    gates: int
    step: Callable
    zero_carry: Callable


def cell_init(key, gates: int, in_features: int, hidden: int, dtype=jnp.float32) -> dict:
    """PyTorch's init: every weight and bias uniform in ±1/sqrt(hidden)."""
    bound = 1.0 / math.sqrt(hidden)
    shapes = {
        "weight_ih": (gates * hidden, in_features),
        "weight_hh": (gates * hidden, hidden),
        "bias_ih": (gates * hidden,),
        "bias_hh": (gates * hidden,),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.uniform(k, shape, dtype, -bound, bound)
        for k, (name, shape) in zip(keys, shapes.items())
    }


def project(params: dict, x_TxBxD, gates: int) -> tuple:
    """The input half of every gate, `x @ weight_ih.T + bias_ih`, as one
    `[T, B, H]` array per gate: the matmul in the weights' dtype (the compute
    dtype), accumulated and returned in float32 at least, like the carry."""
    w_ih = params["weight_ih"]
    out = jnp.promote_types(w_ih.dtype, jnp.float32)
    x_TxBxD = x_TxBxD.astype(w_ih.dtype)
    return tuple(
        add_bias(jnp.matmul(x_TxBxD, w.T, preferred_element_type=out), b.astype(out))
        for w, b in zip(jnp.split(w_ih, gates), jnp.split(params["bias_ih"], gates))
    )


def _recurrent_half(params, h, gates: int) -> list:
    """`h @ weight_hh.T + bias_hh` (one matmul), split per gate: the matmul in the
    weights' dtype, accumulated and returned in the carry's (float32 at least)."""
    w = params["weight_hh"]
    gh = jnp.matmul(h.astype(w.dtype), w.T, preferred_element_type=h.dtype)
    return jnp.split(add_bias(gh, params["bias_hh"].astype(h.dtype)), gates, axis=-1)


def _simple_step(params, h, gx):
    (gh,) = _recurrent_half(params, h, 1)
    h = jnp.tanh(gx[0] + gh)
    return h, h


def _lstm_step(params, carry, gx):
    h, c = carry
    i, f, g, o = (x + r for x, r in zip(gx, _recurrent_half(params, h, 4)))
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _gru_step(params, h, gx):
    x_r, x_z, x_n = gx
    h_r, h_z, h_n = _recurrent_half(params, h, 3)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = (1.0 - z) * n + z * h
    return h, h


def _zeros(batch, hidden, dtype):
    return jnp.zeros((batch, hidden), dtype)


CELLS = {
    "simple": Cell(1, _simple_step, _zeros),
    "lstm": Cell(4, _lstm_step, lambda b, h, dt: (_zeros(b, h, dt), _zeros(b, h, dt))),
    "gru": Cell(3, _gru_step, _zeros),
}


def get_cell(name: str) -> Cell:
    if name not in CELLS:
        raise unknown("rnn cell", name, CELLS)
    return CELLS[name]


def _reverse_within_lengths(x_BxTx, lengths_B):
    """Reverses each sequence's first `lengths[b]` steps, leaving padding in place."""
    t = jnp.arange(x_BxTx.shape[1])
    t_1xT, lengths_Bx1 = t[None, :], lengths_B[:, None]
    index_BxT = jnp.where(t_1xT < lengths_Bx1, lengths_Bx1 - 1 - t_1xT, t_1xT)
    return jnp.take_along_axis(x_BxTx, index_BxT[..., None], axis=1)


def scan_rnn(
    cell: Cell, params: dict, x_BxTxD, *, reverse: bool = False, lengths_B=None, unroll: int = 1
):
    """Runs `cell` over time with one `lax.scan`.

    Args:
      cell: a `Cell` from `get_cell`.
      params: the cell's params (PyTorch layout).
      x_BxTxD: batch-first inputs.
      reverse: process time backwards (the reverse direction of a bidirectional RNN).
      lengths_B: optional valid lengths; steps at or past a sequence's length leave
        its carry unchanged and output zeros. Reversal is within each length, as
        PyTorch's packed sequences do.
      unroll: time steps per loop iteration (`lax.scan`'s `unroll`).

    Returns:
      `(carry, h_BxTxH)`: the final carry (for LSTM `(h, c)`) and every output,
      in the original time order, float32 (or float64) whatever the compute dtype
      of `params` and `x_BxTxD`: only the matmuls run in that dtype.
    """
    batch, steps, _ = x_BxTxD.shape
    hidden = params["weight_hh"].shape[1]
    if reverse and lengths_B is not None:
        x_BxTxD = _reverse_within_lengths(x_BxTxD, lengths_B)
    gx_TxBxH = project(params, jnp.swapaxes(x_BxTxD, 0, 1), cell.gates)
    # The carry is float32 at least: a bfloat16 state loses digits at every step.
    carry = cell.zero_carry(batch, hidden, jnp.promote_types(x_BxTxD.dtype, jnp.float32))
    scan_reverse = reverse and lengths_B is None

    if lengths_B is None:

        def body(carry, gx_BxH):
            return cell.step(params, carry, gx_BxH)

        carry, h_TxBxH = lax.scan(body, carry, gx_TxBxH, reverse=scan_reverse, unroll=unroll)
    else:
        valid_TxB = jnp.arange(steps)[:, None] < lengths_B[None, :]

        def body(carry, inputs):
            gx_BxH, valid_B = inputs
            new_carry, h_BxH = cell.step(params, carry, gx_BxH)
            keep = valid_B[:, None]
            new_carry = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_carry, carry)
            return new_carry, jnp.where(keep, h_BxH, 0.0)

        carry, h_TxBxH = lax.scan(body, carry, (gx_TxBxH, valid_TxB), unroll=unroll)
    h_BxTxH = jnp.swapaxes(h_TxBxH, 0, 1)
    if reverse and lengths_B is not None:
        h_BxTxH = _reverse_within_lengths(h_BxTxH, lengths_B)
    return carry, h_BxTxH


def check_rank(x, rank: int, what: str, layout: str):
    """Raises `ShapeError` unless `x` has `rank` dims (`layout` names them)."""
    if x.ndim != rank:
        raise ShapeError(f"expected {what} of rank {rank} {layout}, got shape {tuple(x.shape)}")
