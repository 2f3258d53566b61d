"""`fml.runtime.apply_process_settings` keeps freed memory for reuse (a program's
second run faults no pages in); `import fml` alone leaves malloc as it is."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import resource
    import fml, jax, jax.numpy as jnp
    fml.runtime.apply_process_settings()

    # A 32 MiB temporary inside the program, as a train step's activations are.
    stack = lambda x: jax.lax.optimization_barrier(jnp.stack([x * i for i in range(8)]))
    stack_sum = jax.jit(lambda x: stack(x).sum(0))
    x = jnp.ones((1024, 1024), jnp.float32)
    # XLA's worker threads take turns running it, each with its own malloc arena:
    # every arena holds the block once it has run the program.
    for _ in range(20):
        stack_sum(x).block_until_ready()
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stack_sum(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults))
    """
)


def _page_faults(keep: str) -> int:
    """Fewest page faults of a warm run of a program, in a fresh process."""
    env = {**os.environ, "FML_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults():
    # Faults of a warm run: 32 MiB of fresh pages = 8192 faults when malloc
    # hands the temporary back to the system.
    system = _page_faults("0")
    kept = _page_faults("1")
    assert system > 8192 * 0.9
    assert kept < 8192 / 50


IMPORT_ONLY = textwrap.dedent(
    """
    import ctypes
    import fml  # noqa: F401

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    held = rss()
    libc.free(block)
    print(held - before, rss() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_import_fml_returns_freed_memory_to_the_system():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, check=True
    )
    held, kept = map(float, out.stdout.split())
    assert held > 250  # the block was resident
    assert kept < 16  # and went back to the system on free
