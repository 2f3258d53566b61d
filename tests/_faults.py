"""Faults the reliability tests inject."""

import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(num_bytes: int):
    """Writes past `num_bytes` fail with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
