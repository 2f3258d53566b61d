"""Process settings for XLA:CPU, applied by entry points (the `fml` command line,
the benchmarks), never by `import fml`: a library does not change its process.

XLA:CPU allocates each program's buffers with `malloc` and frees them when the
program returns. glibc serves large blocks with fresh `mmap`s and trims freed
heap back to the system, so every step touches new pages, and a page fault in
a virtual machine costs microseconds: measured on the 2-core CI machines, an
LSTM train step spent a third of its time faulting pages in (46 ms -> 31 ms
with freed memory kept), and stacking nine 11 MB conv slices took 126 ms
instead of 22 ms. (Limiting malloc to one arena would also keep blocks over
64 MiB, which threads' arenas cannot hold, but it slowed the MLP step by 30%.) Keeping freed memory in the heap for reuse is what PyTorch's
caching allocator does on GPUs; peak memory is unchanged, freed memory is not
returned to the system. XLA's worker threads take turns running a program and
each has its own malloc arena, so the first few runs still fault pages in (one
per arena; measured: about ten runs on 2 cores), then none do.

A program of your own applies it with `fml.runtime.apply_process_settings()`
once, before training (it changes malloc for the whole process: numpy, torch and
TensorFlow too). `FML_KEEP_FREED_MEMORY=0` makes that call a no-op.
"""

import ctypes
import ctypes.util
import os

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_TOP_PAD_BYTES = 64 << 20
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse: no `mmap` per large
    block, no trimming, 64 MiB of slack when the heap grows. Returns whether it
    applied (False off glibc, e.g. on macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _NEVER_TRIM),
        (_M_TOP_PAD, _TOP_PAD_BYTES),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)


def apply_process_settings(platform: str | None = None) -> bool:
    """Applies `keep_freed_memory` when training runs on the CPU backend
    (`platform`, default JAX's default backend) unless `FML_KEEP_FREED_MEMORY=0`.
    Returns whether it applied."""
    if os.environ.get("FML_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform is None:
        import jax

        platform = jax.default_backend()
    return platform == "cpu" and keep_freed_memory()
