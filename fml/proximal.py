"""L1 and elastic-net penalties by proximal steps, as optax transformations.

The L1 penalty `l1 * sum |w|` (over the same leaves as `fml.losses.l2_penalty`:
weight matrices and kernels, not biases) is not differentiable at 0, so a
(sub)gradient step never lands on exact zeros. A proximal step does: after the
smooth part's update, every penalised weight is soft-thresholded,
`w <- sign(w) * max(|w| - step * l1, 0)`.

- `fista(l1)`: FISTA (Beck & Teboulle 2009) with a backtracking line search on
  the smooth objective (`value_fn`, the mean loss plus any l2 penalty) and
  O'Donoghue & Candès' adaptive restart: the full-batch solver for the convex
  families, which reaches the sparse optimum (Lasso, L1 logistic regression,
  elastic net) with exact zeros.
- `proximal_l1(inner, l1)`: any optax optimizer stepping on the L1
  pseudo-gradient, then projected onto its orthant (exact zeros): for SGD
  exactly the proximal step (soft-threshold by `lr * l1`), for Adam its
  preconditioned counterpart; minibatch training of any family (e.g. the MLP).

`l1` lives in the optimizer state (`state.l1`), as data: changing it does not
recompile.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fml.errors import ConfigError, in_range


def penalised(leaf) -> bool:
    """Whether a params leaf carries the L1 (and l2) penalty: rank >= 2 (weights, kernels)."""
    return leaf.ndim >= 2


def l1_penalty(params) -> jax.Array:
    """`sum |w|` over the penalised leaves (weight matrices and kernels)."""
    return sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params) if penalised(p))


def soft_threshold(params, threshold):
    """The proximal map of `threshold * l1_penalty`: penalised leaves shrink toward 0
    by `threshold` (exact zeros inside it); other leaves pass unchanged."""

    def shrink(p):
        if not penalised(p):
            return p
        t = jnp.asarray(threshold, p.dtype)
        return jnp.sign(p) * jnp.maximum(jnp.abs(p) - t, jnp.zeros((), p.dtype))

    return jax.tree.map(shrink, params)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------- any optimizer


class ProximalState(NamedTuple):
    """`inner`: the wrapped optimizer's state; `l1`: the penalty, float32 scalar."""

    inner: optax.OptState
    l1: jax.Array


def pseudo_gradient(params, grads, l1):
    """The L1 objective's steepest-descent (pseudo-)gradient (OWL-QN, Andrew & Gao
    2007): `g + l1 sign(w)` off zero; at zero, `g` shrunk toward 0 by `l1` (0 when
    `|g| <= l1`, where 0 is optimal). Unpenalised leaves keep `g`."""

    def one(w, g):
        if not penalised(w):
            return g
        t = jnp.asarray(l1, g.dtype)
        at_zero = jnp.sign(g) * jnp.maximum(jnp.abs(g) - t, jnp.zeros((), g.dtype))
        return jnp.where(w != 0, g + t * jnp.sign(w), at_zero)

    return jax.tree.map(one, params, grads)


def proximal_l1(
    inner: optax.GradientTransformation, l1: float
) -> optax.GradientTransformationExtraArgs:
    """`inner`'s step on the L1 pseudo-gradient, then every penalised weight that
    left its orthant (crossed or left zero against the pseudo-gradient) set to 0.

    For SGD this is exactly the proximal step (soft-threshold by `lr * l1`, i.e.
    ISTA on the full batch); for adaptive optimizers (Adam) it is their
    preconditioned step with the same exact zeros (OWL-QN's orthant projection).

    Args:
      inner: an optax optimizer (the smooth part's step).
      l1: the L1 strength, >= 0.

    Returns:
      an optax transformation; `update` needs `params`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = proximal_l1(optax.sgd(0.1), 1.0)
      >>> params = {"w": jnp.array([[0.05, -2.0]])}
      >>> updates, _ = tx.update({"w": jnp.zeros((1, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[0.0, -1.899999976158142]]
    """
    l1 = in_range(l1, "l1", 0.0, float("inf"))
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return ProximalState(inner.init(params), jnp.asarray(l1, jnp.float32))

    def update(grads, state, params=None, **extra_args):
        if params is None:
            raise ConfigError("proximal_l1 needs params in update(grads, state, params)")
        descent = pseudo_gradient(params, grads, state.l1)
        updates, inner_state = inner.update(descent, state.inner, params, **extra_args)

        def project(w, d, u):
            if not penalised(w):
                return u
            orthant = jnp.where(w != 0, jnp.sign(w), -jnp.sign(d))
            moved = w + u
            return jnp.where(jnp.sign(moved) == orthant, u, -w)

        updates = jax.tree.map(project, params, descent, updates)
        return updates, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------------- FISTA


class FistaState(NamedTuple):
    """FISTA's state.

    Attributes:
      previous: the iterate before the current params (for the momentum).
      theta: the momentum sequence `θ_k` (1 after a restart).
      step: the last accepted step size.
      l1: the L1 strength, float32 scalar.
    """

    previous: optax.Params
    theta: jax.Array
    step: jax.Array
    l1: jax.Array


def fista(
    l1: float = 0.0,
    *,
    initial_step: float = 1.0,
    grow: float = 2.0,
    shrink: float = 0.5,
    max_backtracking: int = 60,
) -> optax.GradientTransformationExtraArgs:
    """FISTA with backtracking and adaptive restart, for full-batch convex fits.

    Minimises `f(params) + l1 * l1_penalty(params)` where `f` is the smooth
    objective `value_fn` passed to `update` (fml's train step passes the mean
    loss plus the l2 penalty on the whole batch). Each update evaluates `f`'s
    gradient at the extrapolated point `y = x + (θ_{k-1} - 1) / θ_k (x - x_prev)`,
    then tries steps `t` from `grow` times the last one, shrinking by `shrink`
    until `f(x_new) <= f(y) + <∇f(y), x_new - y> + |x_new - y|² / (2t)`; the
    momentum restarts when `<y - x_new, x_new - x> > 0`. The params stay the
    (sparse) proximal iterates `x`. The gradient `update` receives (at `x`) is
    not used.

    Args:
      l1: the L1 strength, >= 0 (0: accelerated gradient descent).
      initial_step: the first step size tried (times `grow`).
      grow, shrink: step-size factors (`grow >= 1 > shrink > 0`).
      max_backtracking: most step shrinks per update.

    Returns:
      an optax transformation; `update(grads, state, params, *, value_fn)`.
    """
    l1 = in_range(l1, "l1", 0.0, float("inf"))
    if not (grow >= 1.0 and 0.0 < shrink < 1.0 and initial_step > 0):
        raise ConfigError(
            f"expected initial_step > 0, grow >= 1 > shrink > 0, got "
            f"{initial_step}, {grow}, {shrink}"
        )

    def init(params):
        return FistaState(
            previous=params,
            theta=jnp.ones((), jnp.float32),
            step=jnp.asarray(initial_step, jnp.float32),
            l1=jnp.asarray(l1, jnp.float32),
        )

    def update(grads, state, params=None, *, value_fn: Callable | None = None, **extra_args):
        del grads, extra_args
        if params is None or value_fn is None:
            raise ConfigError("fista needs params and value_fn in update()")
        theta = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.theta**2))
        beta = (state.theta - 1.0) / theta
        y = jax.tree.map(lambda x, p: x + beta.astype(x.dtype) * (x - p), params, state.previous)
        f_y, g_y = jax.value_and_grad(value_fn)(y)

        def candidate(t):
            moved = jax.tree.map(lambda a, g: a - t.astype(a.dtype) * g, y, g_y)
            return soft_threshold(moved, t * state.l1)

        def too_long(carry):
            t, tries = carry
            x_new = candidate(t)
            diff = jax.tree.map(jnp.subtract, x_new, y)
            bound = f_y + _vdot(g_y, diff) + _vdot(diff, diff) / (2.0 * t)
            return (value_fn(x_new) > bound) & (tries < max_backtracking)

        def shorter(carry):
            t, tries = carry
            return t * shrink, tries + 1

        step, _ = jax.lax.while_loop(
            too_long, shorter, (state.step * grow, jnp.zeros((), jnp.int32))
        )
        x_new = candidate(step)
        restart = (
            _vdot(jax.tree.map(jnp.subtract, y, x_new), jax.tree.map(jnp.subtract, x_new, params))
            > 0
        )
        new_state = FistaState(
            previous=params,
            theta=jnp.where(restart, jnp.ones_like(theta), theta),
            step=step,
            l1=state.l1,
        )
        return jax.tree.map(jnp.subtract, x_new, params), new_state

    return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------ for fit


def l1_optimizer(optimizer, l1: float, batch_size: int, num_examples: int, make_base: Callable):
    """What `fml.fit` trains with for an `l1` penalty: `(optimizer, batch_size)`.

    "fista" becomes `fista(l1)` on the full batch; any other optimizer with
    `l1 > 0` is wrapped in `proximal_l1` (built by `make_base(optimizer)`);
    with `l1 == 0` and not "fista", both come back unchanged.
    """
    l1 = in_range(l1, "l1", 0.0, float("inf"))
    if isinstance(optimizer, str) and optimizer == "fista":
        return fista(l1), num_examples
    if l1 == 0:
        return optimizer, batch_size
    if isinstance(optimizer, str) and optimizer == "lbfgs":
        raise ConfigError(
            "l1 needs a proximal optimizer: 'fista' (full batch) or a minibatch one, not 'lbfgs'"
        )
    return proximal_l1(make_base(optimizer), l1), batch_size
