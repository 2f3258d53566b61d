"""Recurrent networks (simple tanh RNN, LSTM, GRU) over batch-first `[B, T, D]`.

Params follow `torch.nn.RNN/LSTM/GRU`: layer `k` is `params["l{k}"]` (and
`params["l{k}_reverse"]` when bidirectional), each holding `weight_ih`,
`weight_hh`, `bias_ih`, `bias_hh` in PyTorch's fused gate layout; an optional
classifier is `params["head"] = {"w": [H * directions, K], "b": [K]}`.
"""

import jax
import jax.numpy as jnp

from fml import layers as fml_layers
from fml._model import Model
from fml.errors import ConfigError, DTypeError, ShapeError
from fml.models._common import check_float_input, compute_dtype, in_compute_dtype, positive_int


def _layer_names(num_layers: int, bidirectional: bool) -> list[list[str]]:
    suffixes = ["", "_reverse"] if bidirectional else [""]
    return [[f"l{k}{s}" for s in suffixes] for k in range(num_layers)]


def _check_lengths(lengths, x):
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise DTypeError(f"rnn: expected integer lengths, got dtype {lengths.dtype}")
    if lengths.shape != (x.shape[0],):
        raise ShapeError(f"rnn: expected lengths of shape ({x.shape[0]},), got {lengths.shape}")
    return lengths


def rnn(
    cell: str,
    hidden: int,
    *,
    layers: int = 1,
    bidirectional: bool = False,
    return_sequences: bool = False,
    num_classes: int | None = None,
    unroll: int = 1,
    dtype: str = "float32",
) -> Model:
    """A (stacked, optionally bidirectional) recurrent network, one `lax.scan` per layer.

    Args:
      cell: "lstm", "gru" or "simple" (tanh).
      hidden: hidden size H.
      layers: number of stacked layers.
      bidirectional: also run each layer backwards and concatenate (`2H` features).
      return_sequences: return every step `[B, T, ...]` rather than the final state.
      num_classes: if given, a linear head on the output (per step with
        `return_sequences`).
      unroll: time steps per iteration of each scan's loop (`lax.scan`'s
        `unroll`): the same outputs, fewer loop iterations (on a GPU each runs
        one small matmul, launch-bound), a larger program.
      dtype: the compute dtype (as `mlp`'s).

    `apply(params, x, *, key=None, train=False, lengths=None)`: `x` is `[B, T, D]`;
    `lengths` (int `[B]`) marks valid steps. Without `return_sequences` the output
    is the final hidden state of the top layer — for a bidirectional RNN the
    forward state after each sequence's last valid step concatenated with the
    backward state after step 0, i.e. PyTorch's `h_n[-2:]`.

    Example:
      >>> import jax, fml
      >>> model = fml.models.rnn("gru", 32, num_classes=10)
      >>> params = model.init(jax.random.key(0), (40, 1))
      >>> model.apply(params, jax.numpy.ones((2, 40, 1))).shape
      (2, 10)
    """
    cell_fn = fml_layers.get_cell(cell)
    positive_int(hidden, "hidden")
    positive_int(layers, "layers")
    if num_classes is not None:
        positive_int(num_classes, "num_classes")
    positive_int(unroll, "unroll")
    spec = {
        "family": "rnn",
        "cell": cell,
        "hidden": hidden,
        "layers": layers,
        "bidirectional": bool(bidirectional),
        "return_sequences": bool(return_sequences),
        "num_classes": num_classes,
        "unroll": unroll,
        "dtype": compute_dtype(dtype),
    }
    names = _layer_names(layers, bidirectional)
    directions = len(names[0])

    def init(key, input_shape):
        if len(tuple(input_shape)) != 2:
            raise ConfigError(f"rnn: expected input_shape (T, D), got {tuple(input_shape)}")
        features = input_shape[-1]
        keys = iter(jax.random.split(key, layers * directions + 1))
        params = {}
        for k, layer_names in enumerate(names):
            in_features = features if k == 0 else hidden * directions
            for name in layer_names:
                params[name] = fml_layers.cell_init(next(keys), cell_fn.gates, in_features, hidden)
        if num_classes is not None:
            params["head"] = fml_layers.dense_init(next(keys), hidden * directions, num_classes)
        return params

    def apply(params, x_BxTxD, *, key=None, train=False, lengths=None):
        del key, train
        x_BxTxD = check_float_input(x_BxTxD, "rnn")
        features = params["l0"]["weight_ih"].shape[1]
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != features:
            raise ShapeError(f"rnn: expected x of shape (B, T, {features}), got {x_BxTxD.shape}")
        if lengths is not None:
            lengths = _check_lengths(lengths, x_BxTxD)
        h = x_BxTxD
        for layer_names in names:
            outs, finals = [], []
            for name in layer_names:
                carry, out = fml_layers.scan_rnn(
                    cell_fn,
                    params[name],
                    h,
                    reverse=name.endswith("_reverse"),
                    lengths_B=lengths,
                    unroll=unroll,
                )
                outs.append(out)
                finals.append(carry[0] if cell == "lstm" else carry)
            h = jnp.concatenate(outs, axis=-1)
        y = h if return_sequences else jnp.concatenate(finals, axis=-1)
        if num_classes is not None:
            y = fml_layers.dense(params["head"], y)
        return y

    return Model(init, in_compute_dtype(apply, spec["dtype"], "rnn"), spec)
