"""The LSTM workload's recurrent matmul in isolation: `h @ W_hh` ([128, 128] x
[128, 512], float32), 28 dependent steps as the sequence runs them, by XLA:CPU (a
jitted `lax.scan`) and by PyTorch (`torch.mm` in a loop, oneDNN/MKL). It shows how
much of the LSTM's gap to PyTorch is the GEMM itself."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._throughput import cpu_threads
from benchmarks._workloads import LSTM_HIDDEN, WORKLOADS

STEPS = WORKLOADS["lstm"].input_shape[0]
BATCH = WORKLOADS["lstm"].batch_size


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def recurrent_gemm(repeats: int = 50, log=print) -> dict:
    """`{"XLA": GFLOP/s, "PyTorch": GFLOP/s}` of the 28 dependent recurrent matmuls."""
    import torch

    log("[bench] recurrent GEMM: XLA scan vs torch.mm loop")
    torch.set_num_threads(cpu_threads())
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal((BATCH, LSTM_HIDDEN), dtype=np.float32)
    w = rng.standard_normal((LSTM_HIDDEN, 4 * LSTM_HIDDEN), dtype=np.float32) * 0.05
    # Each step feeds a [B, H] slice of its product to the next, as the cell does.
    flops = 2 * STEPS * BATCH * LSTM_HIDDEN * 4 * LSTM_HIDDEN

    @jax.jit
    def xla(h, w):
        return jax.lax.scan(
            lambda h, _: (jnp.tanh((h @ w)[:, :LSTM_HIDDEN]), None), h, None, STEPS
        )[0]

    h_dev, w_dev = jax.device_put(h0), jax.device_put(w)
    xla_s = _median_s(lambda: xla(h_dev, w_dev).block_until_ready(), repeats)
    h_t, w_t = torch.from_numpy(h0), torch.from_numpy(w)

    def eager():
        h = h_t
        with torch.no_grad():
            for _ in range(STEPS):
                h = torch.tanh(torch.mm(h, w_t)[:, :LSTM_HIDDEN])
        return h

    torch_s = _median_s(eager, repeats)
    # The same computation, or the comparison means nothing.
    np.testing.assert_allclose(np.asarray(xla(h_dev, w_dev)), eager().numpy(), atol=1e-4)
    return {"XLA": flops / xla_s / 1e9, "PyTorch": flops / torch_s / 1e9}
