"""The `Model` type: a named pair of pure functions plus a JSON spec."""

import json
from collections.abc import Callable
from typing import Any, NamedTuple

Params = dict[str, Any]


class Model(NamedTuple):
    """A model is a named pair of pure functions and the spec that rebuilds them.

    Attributes:
      init: `init(key, input_shape) -> params`. `input_shape` excludes the batch
        dimension; params are a nested dict with stable string keys.
      apply: `apply(params, x, *, key=None, train=False) -> y`, with `x` batched
        `[B, *input_shape]`. Pure: safe under `jit`, `vmap` and `grad`. `key` feeds
        dropout and is only needed when `train=True`.
      spec: JSON-serialisable dict with the family name and its hyperparameters;
        `fml.models.from_spec(spec)` rebuilds an identical model.
    """

    init: Callable[..., Params]
    apply: Callable[..., Any]
    spec: dict

    @property
    def family(self) -> str:
        return self.spec["family"]

    def __repr__(self) -> str:
        return f"Model({json.dumps(self.spec, sort_keys=True)})"


def canonical_spec(spec: dict) -> dict:
    """The spec after a JSON round trip: tuples become lists, keys are strings."""
    return json.loads(json.dumps(spec))
