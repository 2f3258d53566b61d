"""Outputs and scores of a trained model over whole arrays, in fixed-size jitted
batches (the last one padded, so a new size never recompiles)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fml import metrics as metrics_lib
from fml._model import Model
from fml.data import check_arrays
from fml.step import make_objective


@functools.lru_cache(maxsize=64)
def _jitted_apply(apply):
    return jax.jit(apply)


def predict(model: Model, params, x, *, batch_size: int = 1024, **kwargs) -> np.ndarray:
    """Model outputs for all of `x`, in fixed-size jitted batches (no recompiles)."""
    x = np.asarray(x)
    n = x.shape[0]
    size = min(batch_size, n)
    apply = _jitted_apply(model.apply)
    outputs = []
    for start in range(0, n, size):
        chunk = x[start : start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = np.concatenate([chunk, np.zeros((size - real, *x.shape[1:]), x.dtype)])
        outputs.append(np.asarray(apply(params, chunk, **kwargs))[:real])
    return np.concatenate(outputs)


def evaluate(
    model: Model,
    params,
    x,
    y,
    *,
    loss=None,
    metric=None,
    task: str = "classification",
    batch_size: int = 1024,
) -> dict:
    """Loss and metric over a whole set: `{"loss": float, "accuracy" | "r2": float}`."""
    objective = make_objective(model, loss, task)
    task = "classification" if objective.classify else "regression"
    check_arrays(x, y, task=task, where="evaluation data")
    metric = metric or ("accuracy" if objective.classify else "r2")
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    outputs = jnp.asarray(predict(model, params, x, batch_size=batch_size))
    y = jnp.asarray(y)
    return {
        "loss": float(jnp.mean(objective.loss(outputs, y))),
        metric_name: float(metrics_lib.get(metric)(outputs, y)),
    }
