"""Peak resident memory of one training run (`/usr/bin/time -v`), fml against
PyTorch and hand-written JAX on the same model and data: the MLP workload, 3
epochs of 100 steps. Each run is a separate script; the PyTorch one never imports
jax, the JAX one never imports fml, so their difference to fml is fml's own."""

import re
import subprocess
import sys

TORCH_SCRIPT = """
import numpy as np, torch
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((12800, 784), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, 10, 12800))
net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
for epoch in range(3):
    for xb, yb in zip(x.split(128), y.split(128)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
"""

JAX_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp, optax
rng = np.random.default_rng(0)
x = rng.standard_normal((12800, 784), dtype=np.float32)
y = rng.integers(0, 10, 12800).astype(np.int32)
k0, k1 = jax.random.split(jax.random.key(0))
params = [(jax.random.normal(k0, (784, 128)) / 28.0, jnp.zeros(128)),
          (jax.random.normal(k1, (128, 10)) / 128**0.5, jnp.zeros(10))]
tx = optax.adam(1e-3)

def loss(params, x, y):
    (w0, b0), (w1, b1) = params
    logits = jax.nn.relu(x @ w0 + b0[None]) @ w1 + b1[None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

@jax.jit
def epoch(params, opt_state, x, y):
    def step(carry, batch):
        params, opt_state = carry
        grads = jax.grad(loss)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None
    batches = (x.reshape(100, 128, 784), y.reshape(100, 128))
    return jax.lax.scan(step, (params, opt_state), batches)[0]

opt_state = tx.init(params)
for _ in range(3):
    params, opt_state = epoch(params, opt_state, x, y)
jax.block_until_ready(params)
"""

FML_SCRIPT = """
import numpy as np, fml
rng = np.random.default_rng(0)
x = rng.standard_normal((12800, 784), dtype=np.float32)
y = rng.integers(0, 10, 12800).astype(np.int32)
fml.fit(fml.models.mlp([128, 10]), (x, y), epochs=3, batch_size=128, fused=True, quiet=True)
"""


def peak_rss_mb(script: str) -> float:
    """Maximum resident set size of `python -c script`, in MiB."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", script], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"training run failed: {done.stderr.strip()[-500:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kbytes.group(1)) / 1024


def peak_memory(log=print) -> dict:
    """`{"fml": MiB, "pure JAX": MiB, "PyTorch": MiB}` for the same MLP training run."""
    log("[bench] peak memory: fml, pure JAX and PyTorch training runs")
    scripts = {"fml": FML_SCRIPT, "pure JAX": JAX_SCRIPT, "PyTorch": TORCH_SCRIPT}
    return {name: peak_rss_mb(script) for name, script in scripts.items()}
