"""ONNX from a model's jaxpr, for models PyTorch cannot express (Flax modules).

`apply(params, x)` is traced with a symbolic batch (`jax.export.symbolic_shape`),
and each equation of the jaxpr becomes ONNX nodes; the params are initializers.
Covers what dense and convolutional nets are made of: `dot_general` (a matmul over
the last axis), `conv_general_dilated` (any layout, via transposes to NCHW),
`reduce_window` sums and maxima (pooling), elementwise arithmetic and activations,
reshapes, broadcasts, transposes, reductions and nested `jit`/`custom_jvp` calls.
Anything else raises `ExportError` naming the primitive.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fml._model import Model
from fml.errors import ExportError, require

INPUT_NAME = "x"
OUTPUT_NAME = "y"
OPSET = 17

_ELEMENTWISE = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "sqrt": "Sqrt",
    "abs": "Abs",
    "sign": "Sign",
    "erf": "Erf",
    "floor": "Floor",
    "ceil": "Ceil",
    "gt": "Greater",
    "lt": "Less",
    "ge": "GreaterOrEqual",
    "le": "LessOrEqual",
    "eq": "Equal",
}
_REDUCTIONS = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}  # fmt: skip


class _Graph:
    """ONNX nodes and initializers being built; names are fresh per value."""

    def __init__(self, onnx, batch_name: str):
        self.onnx, self.nodes, self.initializers = onnx, [], []
        self.batch_name, self.count = batch_name, 0

    def fresh(self, hint: str = "v") -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs, **attributes) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attributes))
        return out

    def constant(self, value, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def shape(self, dims) -> str:
        """An int64 shape tensor for `dims`, whose symbolic entries are the batch."""
        if all(isinstance(d, int) for d in dims):
            return self.constant(np.asarray(dims, np.int64), "shape")
        parts = []
        for d in dims:
            if isinstance(d, int):
                parts.append(self.constant(np.asarray([d], np.int64), "dim"))
            elif str(d) == "b":
                parts.append(self.batch_name)
            else:
                raise ExportError(f"onnx: cannot express the symbolic dimension {d} (only b)")
        return self.node("Concat", parts, axis=0)


def _static(dims, what: str) -> tuple:
    if not all(isinstance(d, int) for d in dims):
        raise ExportError(f"onnx: {what} must not depend on the batch, got {dims}")
    return tuple(dims)


def _conv(g: _Graph, eqn, lhs: str, rhs: str) -> str:
    p = eqn.params
    numbers = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise ExportError("onnx: transposed or batch-grouped convolutions are not supported")
    lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
    x = g.node("Transpose", [lhs], perm=list(lhs_spec))  # to N, C, spatial...
    kernel = g.node("Transpose", [rhs], perm=list(rhs_spec))  # to O, I, spatial...
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = g.node(
        "Conv",
        [x, kernel],
        strides=list(p["window_strides"]),
        pads=pads,
        dilations=list(p["rhs_dilation"]),
        group=p["feature_group_count"],
    )
    return g.node("Transpose", [y], perm=list(np.argsort(out_spec)))


def _pool(g: _Graph, eqn, x: str, kind: str) -> str:
    p = eqn.params
    window, strides = p["window_dimensions"], p["window_strides"]
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        raise ExportError("onnx: dilated pooling is not supported")
    spatial = [i for i, w in enumerate(window) if w != 1 or strides[i] != 1]
    if any(p["padding"][i] != (0, 0) for i in range(len(window)) if i not in spatial):
        raise ExportError("onnx: pooling pads a non-spatial axis")
    rest = [i for i in range(len(window)) if i not in spatial]
    if len(rest) < 2:
        raise ExportError(f"onnx: pooling over {len(spatial)} of {len(window)} axes")
    # layout N, C (every other axis merged), spatial...: transpose, pool, transpose back
    perm = [rest[0], *rest[1:], *spatial]
    x = g.node("Transpose", [x], perm=perm)
    attributes = {
        "kernel_shape": [window[i] for i in spatial],
        "strides": [strides[i] for i in spatial],
        "pads": [p["padding"][i][0] for i in spatial] + [p["padding"][i][1] for i in spatial],
    }
    if len(rest) > 2:
        raise ExportError("onnx: pooling of inputs with more than one channel axis")
    if kind == "max":
        y = g.node("MaxPool", [x], **attributes)
    else:
        y = g.node("AveragePool", [x], count_include_pad=1, **attributes)
        y = g.node("Mul", [y, g.constant(np.float32(np.prod(attributes["kernel_shape"])))])
    return g.node("Transpose", [y], perm=list(np.argsort(perm)))


def _broadcast(g: _Graph, eqn, x: str) -> str:
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = eqn.invars[0].aval.shape
    expanded = [1] * len(shape)
    for axis, size in zip(dims, operand):
        expanded[axis] = size
    x = g.node("Reshape", [x, g.shape(expanded)])
    return g.node("Expand", [x, g.shape(shape)])


def _dot(g: _Graph, eqn, lhs: str, rhs: str) -> str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_rank, rhs_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    if lb or rb or tuple(lc) != (lhs_rank - 1,) or tuple(rc) != (0,) or rhs_rank != 2:
        raise ExportError(
            f"onnx: only matmuls over the last axis are supported, got dot_general "
            f"{eqn.params['dimension_numbers']}"
        )
    return g.node("MatMul", [lhs, rhs])


def _equation(g: _Graph, eqn, read) -> list[str]:
    """The ONNX values of `eqn`'s outputs, its inputs read through `read`."""
    name = eqn.primitive.name
    inputs = [read(v) for v in eqn.invars]
    if name in _CALLS:
        inner = eqn.params[_CALLS[name]]
        inner = getattr(inner, "jaxpr", inner)
        consts = getattr(eqn.params[_CALLS[name]], "consts", [])
        return _jaxpr(g, inner, [g.constant(np.asarray(c)) for c in consts], inputs)
    if name in _ELEMENTWISE:
        return [g.node(_ELEMENTWISE[name], inputs)]
    if name in _IDENTITY:
        return [g.node("Identity", inputs[:1])]
    if name == "rsqrt":
        return [g.node("Reciprocal", [g.node("Sqrt", inputs)])]
    if name == "integer_pow":
        return [g.node("Pow", [inputs[0], g.constant(np.float32(eqn.params["y"]))])]
    if name == "square":
        return [g.node("Mul", [inputs[0], inputs[0]])]
    if name == "convert_element_type":
        dtype = np.dtype(eqn.params["new_dtype"])
        to = g.onnx.helper.np_dtype_to_tensor_dtype(dtype)
        return [g.node("Cast", inputs, to=to)]
    if name == "select_n":
        if len(inputs) != 3:
            raise ExportError("onnx: select_n with more than two cases")
        predicate = g.node("Cast", [inputs[0]], to=g.onnx.TensorProto.BOOL)
        return [g.node("Where", [predicate, inputs[2], inputs[1]])]
    if name == "reshape":
        if eqn.params.get("dimensions") is not None:
            raise ExportError("onnx: reshape with dimensions is not supported")
        return [g.node("Reshape", [inputs[0], g.shape(eqn.params["new_sizes"])])]
    if name == "squeeze":
        return [g.node("Reshape", [inputs[0], g.shape(eqn.outvars[0].aval.shape)])]
    if name == "expand_dims":
        return [g.node("Reshape", [inputs[0], g.shape(eqn.outvars[0].aval.shape)])]
    if name == "broadcast_in_dim":
        return [_broadcast(g, eqn, inputs[0])]
    if name == "transpose":
        return [g.node("Transpose", inputs, perm=list(eqn.params["permutation"]))]
    if name == "concatenate":
        return [g.node("Concat", inputs, axis=eqn.params["dimension"])]
    if name in _REDUCTIONS:
        axes = g.constant(np.asarray(eqn.params["axes"], np.int64), "axes")
        return [g.node(_REDUCTIONS[name], [inputs[0], axes], keepdims=0)]
    if name == "dot_general":
        return [_dot(g, eqn, *inputs)]
    if name == "conv_general_dilated":
        return [_conv(g, eqn, *inputs)]
    if name in ("reduce_window_sum", "reduce_window_max"):
        return [_pool(g, eqn, inputs[0], "max" if name.endswith("max") else "sum")]
    raise ExportError(f"onnx: the jax primitive {name!r} has no ONNX translation here")


def _jaxpr(g: _Graph, jaxpr, const_names: list[str], input_names: list[str]) -> list[str]:
    env = dict(zip(jaxpr.constvars, const_names))
    env.update(zip(jaxpr.invars, input_names))

    def read(v):
        if isinstance(v, jax.extend.core.Literal):
            return g.constant(np.asarray(v.val, v.aval.dtype), "literal")
        return env[v]

    for eqn in jaxpr.eqns:
        outs = _equation(g, eqn, read)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def write_jaxpr_onnx(model: Model, params, input_shape, path) -> None:
    """Writes `model.apply(params, x)` as an `.onnx` file with a dynamic batch."""
    onnx = require("onnx", "onnx")
    (batch,) = jax.export.symbolic_shape("b")
    x_spec = jax.ShapeDtypeStruct((batch, *tuple(input_shape)), jnp.float32)
    leaves, tree = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda leaves, x: model.apply(jax.tree.unflatten(tree, leaves), x))(
        leaves, x_spec
    )
    g = _Graph(onnx, "batch")
    shape = g.node("Shape", [INPUT_NAME])
    g.batch_name = g.node(
        "Slice",
        [shape, g.constant(np.asarray([0], np.int64)), g.constant(np.asarray([1], np.int64))],
    )
    param_names = [g.constant(np.asarray(leaf, np.float32), "param") for leaf in leaves]
    consts = [g.constant(np.asarray(c)) for c in closed.consts]
    (out,) = _jaxpr(g, closed.jaxpr, consts, [*param_names, INPUT_NAME])
    g.nodes.append(onnx.helper.make_node("Identity", [out], [OUTPUT_NAME]))
    out_aval = closed.jaxpr.outvars[0].aval
    graph = onnx.helper.make_graph(
        g.nodes,
        "fml",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT,
                                            ["batch", *out_aval.shape[1:]])],
        initializer=g.initializers,
    )  # fmt: skip
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
