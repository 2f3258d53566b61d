"""Train-step throughput of every framework on every workload, and the machine's
float32 matmul peak."""

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import _jax_peers, _keras, _torch_peers
from benchmarks._harness import Timing, measure
from benchmarks._workloads import WORKLOADS, shrink, synthetic_data

RUNNERS = {
    "fml per-step": _jax_peers.fml_step_runner,
    "fml fused epoch": _jax_peers.fml_fused_runner,
    "pure JAX per-step": _jax_peers.pure_jax_step_runner,
    "pure JAX fused epoch": _jax_peers.pure_jax_fused_runner,
    "Flax Linen": _jax_peers.linen_runner,
    "Flax NNX": _jax_peers.nnx_runner,
    "PyTorch eager": _torch_peers.eager_runner,
    "torch.compile": _torch_peers.compiled_runner,
}
KERAS = "Keras 3 (TF)"
FRAMEWORKS = (*RUNNERS, KERAS)


def matmul_peak_gflops(size: int = 2048, repeats: int = 7) -> float:
    """float32 GFLOP/s of a jitted `jnp.dot` of two `size x size` matrices (median)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def throughput(
    workloads=tuple(WORKLOADS),
    frameworks=FRAMEWORKS,
    *,
    repeats: int = 7,
    quick: bool = False,
    log=print,
) -> list[Timing]:
    """Times each framework on each workload (in-process ones interleaved)."""
    import torch

    torch.set_num_threads(cpu_threads())
    timings = []
    for name in workloads:
        workload = shrink(WORKLOADS[name]) if quick else WORKLOADS[name]
        x, y = synthetic_data(workload)
        runners = [RUNNERS[f](workload, x, y) for f in frameworks if f in RUNNERS]
        log(f"[bench] {name}: {', '.join(r.framework for r in runners)}")
        timings += measure(name, runners, repeats)
        if KERAS in frameworks:
            log(f"[bench] {name}: {KERAS} (separate process)")
            result = _keras.run_in_subprocess(name, repeats, quick)
            if isinstance(result, str):
                log(f"[bench] {name}: {result}")
            else:
                timings.append(result)
    return timings


def cpu_threads() -> int:
    import os

    return len(os.sched_getaffinity(0))
