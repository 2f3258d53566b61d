"""Losses. Each takes model outputs and targets and returns the loss of every
example (shape of the targets' batch dims), so callers can mask and average;
`fml.train` takes the (masked) mean.
"""

import jax
import jax.numpy as jnp
import optax

from fml.errors import unknown


def _column(targets, outputs):
    """Targets `[B]` against outputs `[B, 1]` become `[B, 1]`."""
    return targets.reshape(outputs.shape) if targets.ndim == outputs.ndim - 1 else targets


def mse(outputs, targets):
    """Squared error averaged over output dims: `[B, O]`, `[B]` or `[B, O]` -> `[B]`."""
    targets = _column(targets, outputs)
    err = jnp.square(outputs - targets)
    return err.reshape(err.shape[0], -1).mean(-1)


def softmax_cross_entropy(logits, labels):
    """`logits [..., K]`, integer `labels [...]` -> `[...]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_cross_entropy(logits, labels):
    """One logit per example (`[B, 1]` or `[B]`), labels in {0, 1} -> `[B]`."""
    logits = logits.reshape(labels.shape)
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def _signed_targets(scores, labels):
    """±1 targets: binary for one score column, one-vs-rest for K columns."""
    if scores.shape[-1] == 1:
        return (2.0 * labels.astype(scores.dtype) - 1.0)[..., None]
    return 2.0 * jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype) - 1.0


def hinge(scores, labels):
    """Sum over classes of `max(0, 1 - y s)` with y in {-1, +1} (one-vs-rest)."""
    margins = 1.0 - _signed_targets(scores, labels) * scores
    return jax.nn.relu(margins).sum(-1)


def squared_hinge(scores, labels):
    """Sum over classes of `max(0, 1 - y s)²` (one-vs-rest)."""
    margins = 1.0 - _signed_targets(scores, labels) * scores
    return jnp.square(jax.nn.relu(margins)).sum(-1)


def l2_penalty(params) -> jax.Array:
    """`0.5 * sum(w²)` over weight matrices and kernels (leaves of rank >= 2);
    biases, norms' scales and shifts are not penalised."""
    leaves = [p for p in jax.tree.leaves(params) if p.ndim >= 2]
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in leaves)


LOSSES = {
    "mse": mse,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "hinge": hinge,
    "squared_hinge": squared_hinge,
}


REGRESSION_LOSSES = ("mse",)
TASKS = ("classification", "regression")


def task_of(name_or_fn, *, default: str = "classification") -> str:
    """The task a loss trains for: "regression" for mse, "classification" for the
    other named losses; a callable says it with a `task` attribute (see `with_task`),
    else it is `default` (what the targets say: float targets are regression)."""
    if callable(name_or_fn):
        return getattr(name_or_fn, "task", default)
    return "regression" if name_or_fn in REGRESSION_LOSSES else "classification"


def with_task(fn, task: str):
    """`fn` marked as a loss for `task` ("classification" or "regression")."""
    if task not in TASKS:
        raise unknown("task", task, TASKS)

    def loss(outputs, targets):
        return fn(outputs, targets)

    loss.task = task
    loss.__name__ = getattr(fn, "__name__", "loss")
    return loss


def get(name_or_fn):
    """A loss by name, or the callable itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in LOSSES:
        raise unknown("loss", name_or_fn, LOSSES)
    return LOSSES[name_or_fn]
