"""Flax modules as fml models: `from_flax(module)` for Linen and NNX.

A Linen module's `init`/`apply` become the model's, its `"params"` collection the
params (a nested dict); an NNX module class is built from a key with
`cls(**kwargs, rngs=nnx.Rngs(key))` and its `nnx.Param`s, as a pure dict, are
the params. In both, `apply(params, x, *, key, train)` feeds `key` to the
`"dropout"` stream and passes the train flag on (Linen: a `train` or
`deterministic` argument of `__call__`, if it has one; NNX: `module.train()` /
`module.eval()`). The spec records where the module comes from,
`{"family": "flax", "api": "linen" | "nnx", "module": "pkg.mod:Class", "kwargs": {...}}`,
so `fml.models.from_spec` rebuilds it wherever that class is importable.

flax is imported only when a Flax model is built (`pip install 'fml[flax]'`), so
`import fml` does not need it.
"""

import dataclasses
import importlib
import inspect

import jax
import jax.numpy as jnp

from fml._model import Model, canonical_spec
from fml.errors import ConfigError, require

FAMILY = "flax"
APIS = ("linen", "nnx")
_LINEN_FIELDS_SKIPPED = ("parent", "name")


def _source(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _jsonable_kwargs(kwargs: dict | None) -> dict | None:
    """`kwargs` after a JSON round trip, or None when they are not JSON (the spec
    then cannot rebuild the module: restore needs `model=`)."""
    if kwargs is None:
        return None
    try:
        return canonical_spec(dict(kwargs))
    except (TypeError, ValueError):
        return None


def _linen_kwargs(module) -> dict:
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.init and f.name not in _LINEN_FIELDS_SKIPPED
    }


def _train_argument(call) -> str | None:
    """Which flag of a Linen `__call__` says training: "train", "deterministic" or None."""
    parameters = inspect.signature(call).parameters
    return next((name for name in ("train", "deterministic") if name in parameters), None)


def _linen_model(module, kwargs, spec: dict) -> Model:
    flag = _train_argument(module.__call__)

    def flags(train: bool) -> dict:
        if flag is None:
            return {}
        return {flag: train if flag == "train" else not train}

    def init(key, input_shape):
        params_key, dropout_key = jax.random.split(key)
        x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
        variables = module.init({"params": params_key, "dropout": dropout_key}, x, **flags(False))
        others = sorted(set(variables) - {"params"})
        if others:
            raise ConfigError(
                f"from_flax: expected a module whose only variables are 'params', got "
                f"collections {others} too (mutable state such as batch_stats is not "
                "supported: use LayerNorm/GroupNorm)"
            )
        return jax.tree.map(jnp.asarray, dict(variables["params"]))

    def apply(params, x, *, key=None, train=False):
        rngs = {"dropout": key} if key is not None else None
        return module.apply({"params": params}, x, rngs=rngs, **flags(train))

    return Model(init, apply, spec)


def _nnx_model(cls: type, kwargs: dict, spec: dict) -> Model:
    nnx = require("flax.nnx", "flax")

    def build(key):
        params_key, dropout_key = jax.random.split(key)
        return cls(**kwargs, rngs=nnx.Rngs(params=params_key, dropout=dropout_key))

    graphdef, params0, rest0 = nnx.split(build(jax.random.key(0)), nnx.Param, ...)
    others = [
        type(v).__name__
        for _, v in jax.tree.leaves_with_path(rest0, is_leaf=lambda v: isinstance(v, nnx.Variable))
        if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param | nnx.RngState)
    ]
    if others:
        raise ConfigError(
            f"from_flax: expected an NNX module whose variables are nnx.Param (and rng "
            f"streams), got {sorted(set(others))} too (mutable state such as BatchStat is "
            "not supported)"
        )

    def init(key, input_shape):
        del input_shape  # an NNX module is built with its sizes
        _, params, _ = nnx.split(build(key), nnx.Param, ...)
        return jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))

    def apply(params, x, *, key=None, train=False):
        state, rest = jax.tree.map(lambda v: v, (params0, rest0))  # fresh containers
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(graphdef, state, rest)
        if train:
            module.train()
        else:
            module.eval()
        if key is not None:
            nnx.reseed(module, dropout=key)
        return module(x)

    return Model(init, apply, spec)


def from_flax(module, *, kwargs: dict | None = None) -> Model:
    """A Flax module as an fml `Model`.

    Args:
      module: a Linen module instance (`nn.Module`), or an NNX module class (or
        instance, whose class is rebuilt) taking `rngs=` in its constructor.
      kwargs: the constructor arguments. Linen: read off the module's fields when
        None. NNX: required (the module is built from a key with
        `cls(**kwargs, rngs=nnx.Rngs(params=..., dropout=...))`).

    Returns:
      A `Model` with spec `{"family": "flax", "api", "module": "pkg.mod:Class",
      "kwargs"}`; `fml.models.from_spec` rebuilds it when the class is importable
      and `kwargs` are JSON (else `kwargs` is None there and
      `fml.checkpoint.restore(run, model=...)` needs the model).

    Raises:
      ConfigError: not a Flax module, or it carries mutable state (batch_stats).
      MissingDependencyError: flax is not installed.

    Example:
      >>> import jax, flax.linen as nn, fml
      >>> model = fml.models.from_flax(nn.Dense(3))
      >>> params = model.init(jax.random.key(0), (4,))
      >>> model.apply(params, jax.numpy.ones((2, 4))).shape
      (2, 3)
    """
    linen = require("flax.linen", "flax")
    nnx = require("flax.nnx", "flax")
    if isinstance(module, linen.Module):
        cls, api = type(module), "linen"
        kwargs = _linen_kwargs(module) if kwargs is None else dict(kwargs)
    elif isinstance(module, nnx.Module) or (
        isinstance(module, type) and issubclass(module, nnx.Module)
    ):
        cls, api = (module if isinstance(module, type) else type(module)), "nnx"
        if kwargs is None:
            raise ConfigError(
                f"from_flax: an NNX module ({cls.__name__}) needs kwargs=, its constructor "
                "arguments without rngs, so fml can build it from a key"
            )
        kwargs = dict(kwargs)
    else:
        raise ConfigError(
            f"from_flax: expected a flax.linen Module instance or an nnx.Module class, "
            f"got {type(module).__name__}"
        )
    spec = {
        "family": FAMILY,
        "api": api,
        "module": _source(cls),
        "kwargs": _jsonable_kwargs(kwargs),
    }
    if api == "linen":
        return _linen_model(module, kwargs, spec)
    return _nnx_model(cls, kwargs, spec)


def flax_module(*, module: str, kwargs: dict | None, api: str = "linen") -> Model:
    """Rebuilds a `from_flax` model from its spec (the `"flax"` family's factory)."""
    if api not in APIS:
        raise ConfigError(f"expected a flax api in {APIS}, got {api!r}")
    if kwargs is None:
        raise ConfigError(
            f"the flax module {module} was saved without JSON constructor arguments, so "
            "it cannot be rebuilt from its spec; pass model=fml.models.from_flax(...)"
        )
    path, _, qualname = module.partition(":")
    try:
        cls = importlib.import_module(path)
        for name in qualname.split("."):
            cls = getattr(cls, name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"cannot import the flax module {module!r} ({e}); pass "
            "model=fml.models.from_flax(...) to restore it"
        ) from e
    if api == "linen":
        return from_flax(cls(**kwargs))
    return from_flax(cls, kwargs=kwargs)
