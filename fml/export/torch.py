"""PyTorch export: state dicts keyed as standard torch modules name their weights,
the matching `torch.nn.Module` built from the spec, and the way back.

Keys follow the fml param names: `dense.weight` (linear families),
`dense_{i}.weight` (MLP), `conv_{i}.weight` / `dense_{i}.weight` (CNN layer `i`),
`rnn.weight_ih_l{k}[_reverse]` and `head.weight` (RNN, as `nn.LSTM/GRU/RNN`).

The module takes fml's inputs (batch-first, channels-last; CNNs permute to
channels-first inside) and is built for one input shape, because padding and
the first dense layer's size depend on it. Its layers are standard: `nn.Linear`,
`nn.Conv1d/2d`, `nn.MaxPool/AvgPool`, `nn.Flatten`, `nn.Dropout`,
`nn.LSTM/GRU/RNN`; a dense layer after a spatial input flattens NCHW as torch
users do, so its rows are reordered from fml's NHWC flatten. JAX's asymmetric
SAME padding becomes an explicit `nn.ZeroPad`/`nn.ConstantPad` in front.

`deployable_module` puts the run's preprocessing (`fml.preprocessing`) in front of
that module; `write_program` saves it as a standalone `torch.export` program
(`.pt2`, dynamic batch) that `torch.export.load(path).module()` runs with torch
alone, on raw inputs. The state-dict targets hold the model only: their inputs are
preprocessed (the `preprocessing.json` written beside them says how).
"""

import json
import math
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fml import layers
from fml import preprocessing as preprocessing_lib
from fml._model import Model
from fml.errors import CheckpointError, ExportError, require
from fml.rundir import flatten_params, unflatten_params

# ------------------------------------------------------------ weight layouts


class Entry(NamedTuple):
    """One parameter: its fml key ("conv_0/w"), its torch key and the two layout maps."""

    fml_key: str
    torch_key: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]


def _same(a):
    return a


def _transpose(a):
    return a.T


def _conv_to_torch(w):
    """`[*kernel, in, out]` -> `[out, in, *kernel]`."""
    n = w.ndim - 2
    return w.transpose(n + 1, n, *range(n))


def _conv_from_torch(w):
    """`[out, in, *kernel]` -> `[*kernel, in, out]`."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def _flattened_dense(spatial: tuple, channels: int):
    """Layout maps of a dense layer fed by a flattened `[*spatial, channels]` tensor:
    fml flattens channels-last (rows ordered `(*spatial, c)`), torch channels-first
    (rows ordered `(c, *spatial)`)."""

    def to_torch(w):
        out = w.shape[1]
        w = np.moveaxis(w.reshape(*spatial, channels, out), -2, 0)
        return w.reshape(-1, out).T

    def from_torch(w):
        out = w.shape[0]
        w = np.moveaxis(w.T.reshape(channels, *spatial, out), 0, -2)
        return w.reshape(-1, out)

    return to_torch, from_torch


def _linear_entries(fml_name: str, torch_name: str, flattened_from=None) -> list[Entry]:
    maps = _flattened_dense(*flattened_from) if flattened_from else (_transpose, _transpose)
    return [
        Entry(f"{fml_name}/w", f"{torch_name}.weight", *maps),
        Entry(f"{fml_name}/b", f"{torch_name}.bias", _same, _same),
    ]


# ------------------------------------------------------------------- modules


class ChannelsFirst(nn.Module):
    """`[B, *spatial, C] -> [B, C, *spatial]`: fml's channels-last input to torch's layout."""

    def forward(self, x):
        return x.movedim(-1, 1)


class PaddedAvgPool(nn.Module):
    """Average pooling over explicitly (possibly asymmetrically) zero-padded input,
    dividing by the number of real elements in each window, as fml does."""

    def __init__(self, window: tuple, stride: tuple, torch_pads: tuple):
        super().__init__()
        self.window, self.stride, self.torch_pads = window, stride, torch_pads
        self.pool = (F.avg_pool1d, F.avg_pool2d)[len(window) - 1]

    def forward(self, x):
        total = self.pool(F.pad(x, self.torch_pads), self.window, self.stride)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        count = self.pool(F.pad(ones, self.torch_pads), self.window, self.stride)
        return total / count


class RecurrentNet(nn.Module):
    """`nn.LSTM/GRU/RNN` (batch-first) plus an optional linear `head`, with fml's outputs.

    `forward(x, lengths=None)`: `x` is `[B, T, D]`; `lengths` (int `[B]`) packs
    the batch so padding steps are skipped. Without `return_sequences` the output
    is the top layer's final state(s), `h_n[-directions:]` side by side.
    """

    def __init__(self, cell, input_size, hidden, num_layers, bidirectional, return_sequences, head):
        super().__init__()
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU, "simple": nn.RNN}[cell]
        self.rnn = rnn_class(
            input_size, hidden, num_layers, batch_first=True, bidirectional=bidirectional
        )
        self.directions = 2 if bidirectional else 1
        self.return_sequences = return_sequences
        self.head = head

    def forward(self, x, lengths=None):
        steps = x.shape[1]
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(
                x, torch.as_tensor(lengths).cpu(), batch_first=True, enforce_sorted=False
            )
        out, h_n = self.rnn(x)
        if isinstance(h_n, tuple):
            h_n = h_n[0]
        if lengths is not None:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=steps)
        if self.return_sequences:
            y = out
        else:
            y = h_n[-self.directions :].transpose(0, 1).reshape(h_n.shape[1], -1)
        return y if self.head is None else self.head(y)


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # jax.nn.gelu's default
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "silu": nn.SiLU,
    "softplus": nn.Softplus,  # x itself above 20, where log(1 + e^x) - x < 3e-9
}


def _activation(name, where: str):
    """The torch activation module for fml's `name`, or None for the identity."""
    if name in (None, "linear"):
        return None
    if name not in _ACTIVATIONS:
        raise ExportError(
            f"{where}: activation {name!r} has no PyTorch equivalent here; "
            f"exportable: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


# --------------------------------------------------------------------- plans


class Plan(NamedTuple):
    """How one model maps to torch: its module and its parameter entries."""

    module: nn.Module
    entries: list[Entry]


def _sequential(named: list) -> nn.Sequential:
    return nn.Sequential(OrderedDict((name, m) for name, m in named if m is not None))


def _linear_plan(spec, input_shape, shapes) -> Plan:
    del spec, input_shape
    d_in, d_out = shapes["dense"]["w"].shape
    module = _sequential([("flatten", nn.Flatten()), ("dense", nn.Linear(d_in, d_out))])
    return Plan(module, _linear_entries("dense", "dense"))


def _mlp_plan(spec, input_shape, shapes) -> Plan:
    del input_shape
    named, entries = [("flatten", nn.Flatten())], []
    last = len(spec["widths"]) - 1
    for i in range(last + 1):
        name = f"dense_{i}"
        named.append((name, nn.Linear(*shapes[name]["w"].shape)))
        entries += _linear_entries(name, name)
        if i < last:
            named.append((f"act_{i}", _activation(spec["activation"], "mlp")))
            if spec["dropout"] > 0:
                named.append((f"dropout_{i}", nn.Dropout(spec["dropout"])))
    return Plan(_sequential(named), entries)


def _per_dim(value, ndim: int) -> tuple:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def _pads(padding, spatial, window, stride) -> list[tuple[int, int]]:
    """fml's padding as (low, high) per spatial dim (SAME puts the extra one high)."""
    padding = layers.explicit_padding(padding, len(spatial))
    if padding == "VALID":
        return [(0, 0)] * len(spatial)
    if padding == "SAME":
        return [layers._same_pads(n, w, s) for n, w, s in zip(spatial, window, stride)]
    return [tuple(p) for p in padding]


def _torch_pads(pads) -> tuple:
    """(low, high) per dim -> `F.pad` order (last dim first)."""
    return tuple(p for pair in reversed(pads) for p in pair)


def _symmetric(pads, window) -> tuple | None:
    """Per-dim padding a torch layer can apply itself (equal sides, <= window // 2)."""
    if all(lo == hi and lo <= w // 2 for (lo, hi), w in zip(pads, window)):
        return tuple(lo for lo, _ in pads)
    return None


def _out_size(spatial, pads, window, stride) -> tuple:
    return tuple(
        (n + lo + hi - w) // s + 1 for n, (lo, hi), w, s in zip(spatial, pads, window, stride)
    )


def _conv_modules(i, layer, spatial, channels, features):
    ndim = len(spatial)
    kernel = _per_dim(layer["kernel"], ndim)
    stride = _per_dim(layer["stride"], ndim)
    pads = _pads(layer["padding"], spatial, kernel, stride)
    own = tuple(lo for lo, _ in pads) if all(lo == hi for lo, hi in pads) else None
    conv_class = (nn.Conv1d, nn.Conv2d)[ndim - 1]
    pad_class = (nn.ZeroPad1d, nn.ZeroPad2d)[ndim - 1]
    named = [
        (f"pad_{i}", None if own is not None else pad_class(_torch_pads(pads))),
        (f"conv_{i}", conv_class(channels, features, kernel, stride, padding=own or 0)),
        (f"act_{i}", _activation(layer["activation"], f"cnn layer {i}")),
    ]
    return named, _out_size(spatial, pads, kernel, stride)


def _pool_modules(i, layer, spatial):
    ndim = len(spatial)
    window = _per_dim(layer["window"], ndim)
    stride = window if layer["stride"] is None else _per_dim(layer["stride"], ndim)
    pads = _pads(layer["padding"], spatial, window, stride)
    own = _symmetric(pads, window)
    name = f"{layer['type']}_{i}"
    if layer["type"] == "max_pool":
        pool_class = (nn.MaxPool1d, nn.MaxPool2d)[ndim - 1]
        pad_class = (nn.ConstantPad1d, nn.ConstantPad2d)[ndim - 1]
        named = [
            (f"pad_{i}", None if own is not None else pad_class(_torch_pads(pads), -math.inf)),
            (name, pool_class(window, stride, padding=own or 0)),
        ]
    elif own is not None:
        pool_class = (nn.AvgPool1d, nn.AvgPool2d)[ndim - 1]
        named = [(name, pool_class(window, stride, padding=own, count_include_pad=False))]
    else:
        named = [(name, PaddedAvgPool(window, stride, _torch_pads(pads)))]
    return named, _out_size(spatial, pads, window, stride)


def _cnn_plan(spec, input_shape, shapes) -> Plan:
    spatial, channels = tuple(input_shape[:-1]), input_shape[-1]
    flat, flattened_from = False, None  # the NHWC shape the next dense layer's rows come from
    named, entries = [("channels_first", ChannelsFirst())], []
    for i, layer in enumerate(spec["layer_specs"]):
        kind = layer["type"]
        if kind == "conv":
            more, spatial = _conv_modules(i, layer, spatial, channels, layer["features"])
            channels = layer["features"]
            entries += [
                Entry(f"conv_{i}/w", f"conv_{i}.weight", _conv_to_torch, _conv_from_torch),
                Entry(f"conv_{i}/b", f"conv_{i}.bias", _same, _same),
            ]
        elif kind in ("max_pool", "avg_pool"):
            more, spatial = _pool_modules(i, layer, spatial)
        elif kind == "dropout":
            more = [(f"dropout_{i}", nn.Dropout(layer["rate"]))]
        else:  # flatten or dense; a flat input stays as it is
            more = []
            if not flat:
                more.append((f"flatten_{i}", nn.Flatten()))
                flat, flattened_from = True, (spatial, channels)
            if kind == "dense":
                name = f"dense_{i}"
                more += [
                    (name, nn.Linear(*shapes[name]["w"].shape)),
                    (f"act_{i}", _activation(layer["activation"], f"cnn layer {i}")),
                ]
                entries += _linear_entries(name, name, flattened_from)
                flattened_from = None  # later dense layers see torch's own order
        named += more
    return Plan(_sequential(named), entries)


def _rnn_plan(spec, input_shape, shapes) -> Plan:
    suffixes = ["", "_reverse"] if spec["bidirectional"] else [""]
    entries = [
        Entry(f"l{k}{s}/{w}", f"rnn.{w}_l{k}{s}", _same, _same)
        for k in range(spec["layers"])
        for s in suffixes
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    head = None
    if spec["num_classes"] is not None:
        head = nn.Linear(*shapes["head"]["w"].shape)
        entries += _linear_entries("head", "head")
    module = RecurrentNet(
        spec["cell"],
        input_shape[-1],
        spec["hidden"],
        spec["layers"],
        spec["bidirectional"],
        spec["return_sequences"],
        head,
    )
    return Plan(module, entries)


_PLANS = {
    "linear_regression": _linear_plan,
    "logistic_regression": _linear_plan,
    "svm": _linear_plan,
    "mlp": _mlp_plan,
    "cnn": _cnn_plan,
    "rnn": _rnn_plan,
}
_CNN_LAYERS = ("conv", "dense", "max_pool", "avg_pool", "flatten", "dropout")
_RNN_CELLS = ("lstm", "gru", "simple")


def check_exportable(spec: dict) -> None:
    """Raises `ExportError` naming the first family, layer or cell torch cannot express."""
    family = spec.get("family")
    if family not in _PLANS:
        raise ExportError(
            f"model family {family!r} cannot be exported to PyTorch; exportable: {sorted(_PLANS)}"
        )
    if family == "cnn":
        for i, layer in enumerate(spec["layer_specs"]):
            if layer.get("type") not in _CNN_LAYERS:
                raise ExportError(
                    f"cnn layer {i} of type {layer.get('type')!r} cannot be exported to "
                    f"PyTorch; exportable layer types: {list(_CNN_LAYERS)}"
                )
    if family == "rnn" and spec["cell"] not in _RNN_CELLS:
        raise ExportError(
            f"rnn cell {spec['cell']!r} cannot be exported to PyTorch; exportable: "
            f"{list(_RNN_CELLS)}"
        )


def param_shapes(model: Model, input_shape) -> dict:
    """The params' `jax.ShapeDtypeStruct`s for `input_shape`, allocating nothing."""
    return jax.eval_shape(lambda k: model.init(k, tuple(input_shape)), jax.random.key(0))


def plan(model: Model, input_shape) -> Plan:
    """The torch module and parameter entries for `model` on inputs `[B, *input_shape]`."""
    check_exportable(model.spec)
    shapes = param_shapes(model, input_shape)
    return _PLANS[model.family](model.spec, tuple(input_shape), shapes)


# ---------------------------------------------------------------- public API


def torch_module(model: Model, input_shape) -> nn.Module:
    """A `torch.nn.Module` of standard layers computing `model.apply` (in eval mode).

    Args:
      model: any fml family.
      input_shape: the input shape without batch, as given to `model.init`.

    Returns:
      A module taking the same `[B, *input_shape]` float32 inputs as fml (RNNs
      also take `lengths`), into which `to_state_dict(model, params, input_shape)`
      loads with `strict=True`. Call `.train()` to fine-tune it.

    Example:
      >>> import jax, fml
      >>> from fml.export.torch import to_state_dict, torch_module
      >>> model = fml.models.mlp([16, 3])
      >>> params = model.init(jax.random.key(0), (8,))
      >>> net = torch_module(model, (8,))
      >>> net.load_state_dict(to_state_dict(model, params, (8,)), strict=True)
      <All keys matched successfully>
    """
    return plan(model, input_shape).module.eval()


def to_state_dict(model: Model, params, input_shape) -> "OrderedDict[str, torch.Tensor]":
    """`params` as a torch state dict for `torch_module(model, input_shape)`.

    Weights are copied into PyTorch's layouts (Linear `[out, in]`, Conv
    `[out, in, *kernel]`, NHWC-flatten rows reordered to NCHW); RNN weights are
    a rename.
    """
    entries = plan(model, input_shape).entries
    flat = flatten_params(params)
    _check_keys("params", set(flat), [e.fml_key for e in entries])
    return OrderedDict(
        (e.torch_key, torch.tensor(np.ascontiguousarray(e.to_torch(flat[e.fml_key]))))
        for e in entries
    )


def from_state_dict(model: Model, state_dict, input_shape) -> dict:
    """fml params from a torch state dict of `torch_module(model, input_shape)`'s layout.

    The reverse of `to_state_dict`, exactly (a pure relayout): a model trained in
    PyTorch can be evaluated or fine-tuned in fml.

    Raises:
      CheckpointError: a key is missing or unexpected, or a tensor has the wrong
        shape or a non-float dtype; the message names the key, expected and got.
    """
    entries = plan(model, input_shape).entries
    expected = flatten_params(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(model, input_shape))
    )
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    _check_keys("state dict", set(state_dict), [e.torch_key for e in entries])
    flat = {}
    for e in entries:
        value = _to_numpy(state_dict[e.torch_key], e.torch_key)
        want = e.to_torch(expected[e.fml_key])
        if value.shape != want.shape:
            raise CheckpointError(
                f"state dict key {e.torch_key!r}: expected shape {tuple(want.shape)}, "
                f"got {tuple(value.shape)}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(
                f"state dict key {e.torch_key!r}: expected a float tensor, got dtype {value.dtype}"
            )
        flat[e.fml_key] = jnp.asarray(e.from_torch(value).astype(want.dtype))
    return unflatten_params(flat)


# The tensor dtypes a state dict may hold weights in (float8 and the like are refused).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _to_numpy(value, key: str) -> np.ndarray:
    """A state dict entry as a numpy float array, or `CheckpointError` naming `key`."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"state dict key {key!r}: expected a float tensor, got dtype {value.dtype} "
                f"(fml reads {', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)})"
            )
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"state dict key {key!r}: expected an array, got {e}") from e


def _check_keys(what: str, got: set, expected: list) -> None:
    """Raises `CheckpointError` naming the first missing or unexpected key."""
    missing = [k for k in expected if k not in got]
    extra = sorted(got - set(expected))
    if missing or extra:
        problem = (
            f"is missing key {missing[0]!r}" if missing else f"has unexpected key {extra[0]!r}"
        )
        raise CheckpointError(f"{what} {problem}; expected keys {expected}, got {sorted(got)}")


def save_state_dict(state_dict, path) -> None:
    """Writes a state dict as `.safetensors` (by suffix) or else with `torch.save`.

    Unverified; `fml.export.export(..., to="torch" | "safetensors")` checks the
    file against fml and writes atomically.
    """
    if str(path).endswith(".safetensors"):
        require("safetensors.torch", "torch").save_file(dict(state_dict), str(path))
    else:
        torch.save(OrderedDict(state_dict), str(path))


# safetensors dtype names and their sizes in bytes.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def safetensors_header(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, dtype)}` of a `.safetensors` file, read from its JSON header
    alone and checked against the file's size (no tensor is read).

    Raises:
      CheckpointError: the header is malformed or names data the file does not hold.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return {
            name: _tensor_entry(name, entry, size - 8 - length)
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except FileNotFoundError as e:
        raise CheckpointError(f"no state dict file at {path}") from e
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e


def _tensor_entry(name: str, entry, data_bytes: int) -> tuple[tuple[int, ...], str]:
    """`(shape, dtype)` of one header entry; ValueError unless its data fits the file."""
    ok = (
        isinstance(entry, dict)
        and entry.get("dtype") in SAFETENSORS_DTYPES
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
    )
    if not ok:
        raise ValueError(f"tensor {name!r} has a malformed header entry {entry!r:.200}")
    begin, end = entry["data_offsets"]
    want = math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]]
    if not (0 <= begin <= end <= data_bytes and end - begin == want):
        raise ValueError(
            f"tensor {name!r} of shape {entry['shape']} and dtype {entry['dtype']} needs "
            f"{want} bytes, its offsets {entry['data_offsets']} give {end - begin} of {data_bytes}"
        )
    return tuple(entry["shape"]), entry["dtype"]


def torch_zip_check(path) -> None:
    """Checks a `torch.save` zip from its directory alone (no tensor is read): a
    `data.pkl` and every entry stored uncompressed, as torch writes them, holding no
    more bytes than the file (so a zip bomb is refused before anything inflates).

    Raises:
      CheckpointError: the zip is malformed, compressed or not a torch state dict.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a valid torch.save zip: {e}") from e
    if not any(e.filename.rsplit("/", 1)[-1] == "data.pkl" for e in entries):
        raise CheckpointError(f"{path} is a zip without data.pkl, not a torch.save state dict")
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path}: expected the uncompressed entries torch.save writes, got "
            f"{compressed[0]!r} compressed"
        )
    declared, size = sum(e.file_size for e in entries), os.path.getsize(path)
    if declared > size:
        raise CheckpointError(
            f"{path}: its entries declare {declared} bytes, more than the file's {size}"
        )


def _check_shapes(path, got: dict, expected: dict) -> None:
    """Raises `CheckpointError` unless `got` (`{key: shape}`) holds exactly `expected`."""
    _check_keys(f"state dict {path}", set(got), list(expected))
    for k, shape in expected.items():
        if tuple(got[k]) != tuple(shape):
            raise CheckpointError(
                f"state dict {path} key {k!r}: expected shape {tuple(shape)}, got {tuple(got[k])}"
            )


def load_state_dict(path, *, expected: dict | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Reads a state dict written by `torch.save` (a zip; loaded with `weights_only=True`)
    or by safetensors, never unpickling code.

    Args:
      path: the file.
      expected: `{torch_key: shape}` the file must hold exactly: checked from a
        safetensors header before any tensor is read, and on a torch zip (whose
        size is first checked from its directory) once it is read.

    Raises:
      CheckpointError: the file is missing, not a state dict, or does not match
        `expected`.
    """
    try:
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
    except FileNotFoundError as e:
        raise CheckpointError(f"no state dict file at {path}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read a state dict from {path}: {e}") from e
    if is_zip:
        torch_zip_check(path)
    else:
        header = safetensors_header(path)
        if expected is not None:
            _check_shapes(path, {k: shape for k, (shape, _) in header.items()}, expected)
    try:
        if is_zip:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            state = require("safetensors.torch", "torch").load_file(str(path))
    except FileNotFoundError as e:
        raise CheckpointError(f"no state dict file at {path}") from e
    except Exception as e:  # torch and safetensors raise many types for bad files
        raise CheckpointError(f"cannot read a state dict from {path}: {e}") from e
    if not (isinstance(state, Mapping) and all(torch.is_tensor(v) for v in state.values())):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors, got {type(state).__name__}"
        )
    if expected is not None:
        _check_shapes(path, {k: v.shape for k, v in state.items()}, expected)
    return OrderedDict(state)


# ------------------------------------------------------- `fml.export` target


def _metadata(model: Model, input_shape) -> dict[str, str]:
    return {"fml_spec": json.dumps(model.spec), "input_shape": json.dumps(list(input_shape))}


def write_pt(model: Model, params, input_shape, path, *, preprocessing=None) -> None:
    """Writes `to_state_dict(...)` with `torch.save` (reload with `weights_only=True`);
    the model only (`preprocessing` goes to the `preprocessing.json` beside it)."""
    del preprocessing
    save_state_dict(to_state_dict(model, params, input_shape), path)


def write_safetensors(model: Model, params, input_shape, path, *, preprocessing=None) -> None:
    """Writes `to_state_dict(...)` as safetensors; the spec, input shape and
    preprocessing block are its metadata."""
    state_dict = to_state_dict(model, params, input_shape)
    metadata = _metadata(model, input_shape)
    if preprocessing is not None:
        metadata["fml_preprocessing"] = json.dumps(preprocessing)
    require("safetensors.torch", "torch").save_file(dict(state_dict), str(path), metadata=metadata)


def _preprocessed(x, preprocessing) -> torch.Tensor:
    if preprocessing is not None:
        x = preprocessing_lib.apply(preprocessing, x)
    return torch.from_numpy(np.asarray(x, np.float32))


def run_file(model: Model, input_shape, path, x, *, preprocessing=None) -> np.ndarray:
    """Loads a state dict file into `torch_module` (strictly) and runs it on `x`, after
    `preprocessing` (applied here, in numpy, as a user of the file would)."""
    net = torch_module(model, input_shape)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict(load_state_dict(path, expected=expected), strict=True)
    with torch.no_grad():
        return net(_preprocessed(x, preprocessing)).numpy()


class Preprocess(nn.Module):
    """A preprocessing block's steps (`fml.preprocessing`) as a torch module (float32)."""

    def __init__(self, block: dict):
        super().__init__()
        self.block = block
        self.steps = preprocessing_lib.transforms(
            block, asarray=lambda v: torch.tensor(v, dtype=torch.float32)
        )

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x


def deployable_module(model: Model, params, input_shape, preprocessing=None) -> nn.Module:
    """`torch_module` with `params` loaded and `preprocessing` in front, in eval mode: it
    takes raw inputs `[B, *raw_shape]`."""
    net = torch_module(model, input_shape)
    net.load_state_dict(to_state_dict(model, params, input_shape), strict=True)
    block = preprocessing or preprocessing_lib.identity(input_shape)
    return nn.Sequential(Preprocess(block), net).eval()


def dynamic_dims(model: Model, input_shape, preprocessing=None) -> dict:
    """`torch.export` dims of the input: the batch, and an RNN's time axis when the
    raw input is the model's."""
    block = preprocessing or preprocessing_lib.identity(input_shape)
    dims = {0: torch.export.Dim("batch")}
    if model.family == "rnn" and tuple(block["raw_shape"]) == tuple(input_shape):
        dims[1] = torch.export.Dim("time")
    return dims


def write_program(model: Model, params, input_shape, path, *, preprocessing=None) -> None:
    """Writes `deployable_module(...)` as a `torch.export` program (`.pt2`, dynamic
    batch): `torch.export.load(path).module()(x)` runs it without fml."""
    net = deployable_module(model, params, input_shape, preprocessing)
    block = preprocessing or preprocessing_lib.identity(input_shape)
    example = torch.zeros((2, *block["raw_shape"]))
    dims = dynamic_dims(model, input_shape, block)
    if 1 in dims:  # an RNN's time axis: dynamic where the module allows it (Dim.AUTO)
        dims[1] = torch.export.Dim.AUTO
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, str(path))


def run_program(model: Model, input_shape, path, x, *, preprocessing=None) -> np.ndarray:
    """Loads the `.pt2` program at `path` with `torch.export.load` and runs it on `x`."""
    del model, input_shape, preprocessing  # the program holds them
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, np.float32))).numpy()
