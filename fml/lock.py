"""An exclusive lock on a run directory, so that two writers never mix their files.

`run_lock(run_dir)` holds `RUN_DIR/.fml-lock` (an `fcntl.flock` on a file that
names the holder's pid and host) while a run, a checkpoint save or an export
writes the directory. A second process that asks for it gets a
`CheckpointError` naming the holder at once, instead of waiting or mixing its
files with the first's. The kernel drops the lock when its holder dies, so a
lock file left by a killed process (its pid gone) is simply taken over.
Within one process the lock is re-entrant: nested `run_lock`s of the same
directory (a run that saves checkpoints and then its run files) share it.

Example:
  >>> import tempfile
  >>> from fml.lock import run_lock
  >>> run_dir = tempfile.mkdtemp()
  >>> with run_lock(run_dir):
  ...     pass  # write the run's files here
"""

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import threading

from fml.errors import CheckpointError

LOCK_FILE = ".fml-lock"

# Locks this process holds: {lock path: [fd, depth]}.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def holder(run_dir) -> dict | None:
    """`{"pid": ..., "host": ...}` written in `run_dir`'s lock file, or None."""
    try:
        value = json.loads((pathlib.Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe(run_dir) -> str:
    found = holder(run_dir) or {}
    return f"pid {found.get('pid', '?')} on host {found.get('host', '?')}"


def _acquire(path: pathlib.Path) -> int:
    """An open fd holding the flock on `path` (created if needed); raises when held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointError(
                    f"run directory {path.parent} is being written by another process "
                    f"({_describe(path.parent)}); wait for it to finish or use another "
                    "directory"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder released (and removed) it meanwhile
            same = False
        if same:
            return fd
        os.close(fd)


def _acquire_and_sign(path: pathlib.Path) -> int:
    """`_acquire`, then this process's pid and host written into the lock file."""
    try:
        fd = _acquire(path)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot lock run directory {path.parent}: {e}") from e
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    except OSError as e:
        os.close(fd)
        raise CheckpointError(f"cannot lock run directory {path.parent}: {e}") from e
    return fd


@contextlib.contextmanager
def run_lock(run_dir, *, writer: bool = True):
    """Holds the exclusive lock of `run_dir` (created if missing) for the block.

    Args:
      run_dir: the run directory.
      writer: whether this process writes it; False (the processes other than 0
        of a multi-process run) makes the lock a no-op.

    Raises:
      CheckpointError: another process holds it (the message names its pid and
        host), or the directory cannot be created or locked.
    """
    run_dir = pathlib.Path(run_dir)
    if not writer:
        yield run_dir
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir.resolve() / LOCK_FILE
    except OSError as e:
        raise CheckpointError(f"cannot lock run directory {run_dir}: {e}") from e
    key = str(path)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            _HELD[key] = [_acquire_and_sign(path), 1]
    try:
        yield run_dir
    finally:
        with _HELD_GUARD:
            _HELD[key][1] -= 1
            if _HELD[key][1] == 0:
                fd, _ = _HELD.pop(key)
                with contextlib.suppress(OSError):
                    path.unlink()  # while still holding it: a waiter re-checks the inode
                os.close(fd)
