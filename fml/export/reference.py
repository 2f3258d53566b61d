"""What every export is written from and verified against: the model in float32,
its matmuls and convolutions at `highest` precision.

On an accelerator the default matmul precision is lower (TF32 on recent NVIDIA
GPUs, one-pass bfloat16 on TPUs): a reference computed there differs from a
correct export by more than its tolerance (6e-4 to 1e-2 where 1e-4 is allowed),
and a program serialised at the default precision gives a TF32 answer on a GPU.
Both are pinned to `highest` here, whatever `jax.default_matmul_precision` says.
"""

import jax

from fml import models
from fml._model import Model


def float32_model(model: Model) -> Model:
    """`model` rebuilt with compute dtype float32 (exports stay float32); a model
    whose spec names no compute dtype is returned as it is."""
    if model.spec.get("dtype", "float32") == "float32":
        return model
    return models.from_spec({**model.spec, "dtype": "float32"})


def highest_precision(apply):
    """`apply` traced with every matmul and convolution at precision HIGHEST."""

    def apply_at_highest(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return apply(*args, **kwargs)

    return apply_at_highest


def reference(model: Model):
    """The jitted `(params, x) -> y` exports are checked against: the float32 model's
    apply at `highest` precision."""
    apply = float32_model(model).apply
    return jax.jit(highest_precision(lambda params, x: apply(params, x)))
