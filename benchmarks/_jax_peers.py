"""JAX runners: fml (per step and fused epoch), hand-written pure JAX (per step
and fused epoch), Flax Linen and Flax NNX."""

import jax
import jax.numpy as jnp
import optax
from jax import lax

from benchmarks._harness import Runner
from benchmarks._workloads import LSTM_HIDDEN, NUM_CLASSES, Workload, fml_model
from fml import train

LEARNING_RATE = 1e-3


def _device_batches(x, y, batch_size):
    x, y = jax.device_put(x), jax.device_put(y)
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)
    ]


def _loop_runner(framework, note, workload, step, carry, batches) -> Runner:
    """A per-step runner: `step(carry, x, y) -> carry` over every batch."""
    state = {"carry": carry}

    def run(batch_list):
        c = state["carry"]
        for x_B, y_B in batch_list:
            c = step(c, x_B, y_B)
        state["carry"] = jax.block_until_ready(c)

    def repeat():
        for _ in range(workload.passes):
            run(batches)

    return Runner(
        framework,
        note,
        lambda: run(batches[:1]),
        repeat,
        workload.samples_per_repeat,
        workload.batch_size,
    )


# ------------------------------------------------------------------------ fml


def fml_state_and_step(workload: Workload):
    """fml's own pieces: `(model, state, train_step)` as `fit` builds them."""
    model = fml_model(workload)
    tx = train.make_optimizer("adam", LEARNING_RATE)
    state = train.init_state(model, tx, workload.input_shape)
    step = train.make_train_step(model, train.make_objective(model), tx, penalize=False)
    return model, state, step


def fml_step_runner(workload: Workload, x, y) -> Runner:
    _, state, train_step = fml_state_and_step(workload)
    step = jax.jit(train_step, donate_argnums=0)
    mask = jnp.ones((workload.batch_size,), jnp.float32)

    def one(state, x_B, y_B):
        return step(state, {"x": x_B, "y": y_B, "mask": mask})[0]

    batches = _device_batches(x, y, workload.batch_size)
    return _loop_runner("fml per-step", "jit(make_train_step)", workload, one, state, batches)


def _fused_runner(framework, note, workload, epoch, carry, x, y) -> Runner:
    x, y = jax.device_put(x), jax.device_put(y)
    key = jax.random.key(1)
    state = {"carry": carry}

    def repeat():
        c = state["carry"]
        for _ in range(workload.passes):
            c = epoch(c, x, y, key)
        state["carry"] = jax.block_until_ready(c)

    def first():
        state["carry"] = jax.block_until_ready(epoch(state["carry"], x, y, key))

    samples_per_epoch = workload.steps * workload.batch_size
    return Runner(framework, note, first, repeat, workload.samples_per_repeat, samples_per_epoch)


def fml_fused_runner(workload: Workload, x, y) -> Runner:
    _, state, train_step = fml_state_and_step(workload)
    run_epoch = jax.jit(
        train.make_epoch(train_step, batch_size=workload.batch_size), donate_argnums=0
    )
    epoch = lambda s, x, y, key: run_epoch(s, x, y, key)[0]
    return _fused_runner("fml fused epoch", "jit(make_epoch)", workload, epoch, state, x, y)


# ------------------------------------------------------------------- pure JAX


def _affine(p, x):
    """`x @ w + b`, the bias broadcast explicitly (rank promotion may be an error)."""
    y = x @ p["w"]
    return y + p["b"].reshape((1,) * (y.ndim - 1) + p["b"].shape)


def _mlp(p, x):
    return _affine(p["dense_1"], jax.nn.relu(_affine(p["dense_0"], x)))


def _cnn(p, x_BxHxWxC):
    h = lax.conv_general_dilated(
        x_BxHxWxC, p["conv_0"]["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + p["conv_0"]["b"].reshape(1, 1, 1, -1))
    b, height, width, c = h.shape
    h = h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))
    h = jax.nn.relu(_affine(p["dense_2"], h.reshape(b, -1)))
    return _affine(p["dense_3"], h)


def _lstm(p, x_BxTxD):
    cell = p["l0"]
    input_half = {"w": cell["weight_ih"].T, "b": cell["bias_ih"] + cell["bias_hh"]}
    gx_TxBxG = jnp.swapaxes(_affine(input_half, x_BxTxD), 0, 1)
    w_hh = cell["weight_hh"].T

    def body(carry, gx_BxG):
        h, c = carry
        i, f, g, o = jnp.split(gx_BxG + h @ w_hh, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), None

    zeros = jnp.zeros((x_BxTxD.shape[0], LSTM_HIDDEN), x_BxTxD.dtype)
    (h, _), _ = lax.scan(body, (zeros, zeros), gx_TxBxG)
    return _affine(p["head"], h)


def _logistic(p, x):
    return _affine(p["dense"], x)


PURE_JAX_APPLY = {"mlp": _mlp, "cnn": _cnn, "lstm": _lstm, "logistic": _logistic}


def pure_jax_step(workload: Workload):
    """`step((params, opt_state), x, y) -> ((params, opt_state), loss)`, hand-written."""
    apply = PURE_JAX_APPLY[workload.name]
    tx = optax.adam(LEARNING_RATE)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    def step(carry, x, y):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return tx, step


def _pure_jax_carry(workload: Workload, tx):
    params = fml_model(workload).init(jax.random.key(0), workload.input_shape)
    return params, tx.init(params)


def pure_jax_step_runner(workload: Workload, x, y) -> Runner:
    tx, step = pure_jax_step(workload)
    jitted = jax.jit(lambda c, x, y: step(c, x, y)[0], donate_argnums=0)
    batches = _device_batches(x, y, workload.batch_size)
    carry = _pure_jax_carry(workload, tx)
    return _loop_runner("pure JAX per-step", "jit, optax.adam", workload, jitted, carry, batches)


def shuffled_scan_epoch(step, batch_size):
    """`epoch(carry, x, y, key) -> carry`: shuffle, then `lax.scan` `step` over batches."""

    def epoch(carry, x, y, key):
        index_SxB = jax.random.permutation(key, x.shape[0]).reshape(-1, batch_size)

        def body(carry, index_B):
            return step(carry, x[index_B], y[index_B])

        return lax.scan(body, carry, index_SxB)[0]

    return epoch


def pure_jax_fused_runner(workload: Workload, x, y) -> Runner:
    tx, step = pure_jax_step(workload)
    epoch = jax.jit(shuffled_scan_epoch(step, workload.batch_size), donate_argnums=0)
    carry = _pure_jax_carry(workload, tx)
    return _fused_runner(
        "pure JAX fused epoch", "jit(scan), optax.adam", workload, epoch, carry, x, y
    )


# ------------------------------------------------------------------ Flax Linen


def _linen_module(workload: Workload):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            if workload.name == "mlp":
                x = nn.relu(nn.Dense(128)(x))
            elif workload.name == "cnn":
                x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
                x = nn.max_pool(x, (2, 2), (2, 2))
                x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
            elif workload.name == "lstm":
                x = nn.RNN(nn.OptimizedLSTMCell(LSTM_HIDDEN))(x)[:, -1]
            return nn.Dense(NUM_CLASSES)(x)

    return Net()


def linen_runner(workload: Workload, x, y) -> Runner:
    net = _linen_module(workload)
    params = net.init(jax.random.key(0), jnp.asarray(x[:1]))
    tx = optax.adam(LEARNING_RATE)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(params, x), y).mean()

    def step(carry, x, y):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step, donate_argnums=0)
    batches = _device_batches(x, y, workload.batch_size)
    note = "jit per step; nn.max_pool" if workload.name == "cnn" else "jit per step"
    return _loop_runner("Flax Linen", note, workload, step, (params, tx.init(params)), batches)


# -------------------------------------------------------------------- Flax NNX


def _nnx_module(workload: Workload):
    from flax import nnx

    rngs = nnx.Rngs(0)
    features = workload.input_shape[-1]

    class Net(nnx.Module):
        def __init__(self):
            if workload.name == "mlp":
                self.hidden = nnx.Linear(features, 128, rngs=rngs)
            elif workload.name == "cnn":
                self.conv = nnx.Conv(1, 32, (3, 3), padding="VALID", rngs=rngs)
                self.hidden = nnx.Linear(13 * 13 * 32, 128, rngs=rngs)
            elif workload.name == "lstm":
                self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(features, LSTM_HIDDEN, rngs=rngs))
            width = {"mlp": 128, "cnn": 128, "lstm": LSTM_HIDDEN}.get(workload.name, features)
            self.out = nnx.Linear(width, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):
            if workload.name == "cnn":
                x = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), (2, 2))
                x = x.reshape(x.shape[0], -1)
            if workload.name in ("mlp", "cnn"):
                x = nnx.relu(self.hidden(x))
            if workload.name == "lstm":
                x = self.rnn(x)[:, -1]
            return self.out(x)

    return Net()


def nnx_runner(workload: Workload, x, y) -> Runner:
    from flax import nnx

    model = _nnx_module(workload)
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    def one(loss, x_B, y_B):  # the last loss is ready only once every step has run
        return step(model, optimizer, x_B, y_B)

    batches = _device_batches(x, y, workload.batch_size)
    return _loop_runner("Flax NNX", "nnx.jit per step", workload, one, jnp.zeros(()), batches)


def first_step_agreement(workload: Workload, x, y) -> tuple[float, float, float]:
    """fml's step against the hand-written pure-JAX step from the same params on
    the first batch: `(fml loss, pure-JAX loss, max |param difference| after)`."""
    _, state, train_step = fml_state_and_step(workload)
    x_B, y_B = jnp.asarray(x[: workload.batch_size]), jnp.asarray(y[: workload.batch_size])
    mask = jnp.ones((workload.batch_size,), jnp.float32)
    tx, step = pure_jax_step(workload)
    (ref_params, _), ref_loss = jax.jit(step)((state.params, tx.init(state.params)), x_B, y_B)
    fml_state, metrics = jax.jit(train_step)(state, {"x": x_B, "y": y_B, "mask": mask})
    diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), fml_state.params, ref_params)
    return float(metrics["loss"]), float(ref_loss), float(max(jax.tree.leaves(diffs)))
