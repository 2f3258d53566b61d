"""Metrics on whole sets of outputs: `metric(outputs, targets) -> scalar`."""

import jax.numpy as jnp

from fml.errors import unknown


def predict_labels(outputs):
    """Class labels from logits or scores: argmax, or `> 0` for one column."""
    if outputs.shape[-1] == 1:
        return (outputs[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(outputs, axis=-1)


def accuracy(outputs, labels):
    """Fraction of examples whose predicted label equals `labels`."""
    return jnp.mean(predict_labels(outputs) == labels)


def r2(outputs, targets):
    """Coefficient of determination, averaged uniformly over outputs (scikit-learn's)."""
    targets = targets.reshape(outputs.shape) if targets.ndim == outputs.ndim - 1 else targets
    ss_res = jnp.sum(jnp.square(targets - outputs), axis=0)
    ss_tot = jnp.sum(jnp.square(targets - targets.mean(0, keepdims=True)), axis=0)
    return jnp.mean(1.0 - ss_res / ss_tot)


METRICS = {"accuracy": accuracy, "r2": r2}


def get(name_or_fn):
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in METRICS:
        raise unknown("metric", name_or_fn, METRICS)
    return METRICS[name_or_fn]
