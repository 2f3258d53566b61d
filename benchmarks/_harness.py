"""Timing: runners measured in interleaved repeats, medians and spreads."""

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple


class Runner(NamedTuple):
    """One framework's training loop on one workload.

    `first()` runs the first step (compiling); `repeat()` runs one timed repeat
    of `samples` examples and returns only once the work is done.
    """

    framework: str
    note: str
    first: Callable[[], None]
    repeat: Callable[[], None]
    samples: int
    first_samples: int


class Timing(NamedTuple):
    """Measured throughput of one framework on one workload."""

    workload: str
    framework: str
    note: str
    seconds: list  # one per repeat
    samples: int  # examples per repeat
    first_call_s: float  # wall time of the first step or epoch, compile included
    compile_s: float  # first call minus the steady-state time of the same work

    @property
    def samples_per_s(self) -> float:
        return self.samples / statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats' times."""
        median = statistics.median(self.seconds)
        return (max(self.seconds) - min(self.seconds)) / median

    def to_json(self) -> dict:
        return {**self._asdict(), "samples_per_s": self.samples_per_s, "spread": self.spread}

    @classmethod
    def from_json(cls, d: dict) -> "Timing":
        return cls(**{k: d[k] for k in cls._fields})


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(workload_name: str, runners: list[Runner], repeats: int) -> list[Timing]:
    """Warms every runner up, then times `repeats` rounds, each round running
    every runner once in turn (interleaved, so machine noise hits all alike)."""
    first = [_timed(r.first) for r in runners]
    for r in runners:  # one untimed repeat: caches, allocators, lazy init
        r.repeat()
    seconds = [[] for _ in runners]
    for _ in range(repeats):
        for r, times in zip(runners, seconds):
            times.append(_timed(r.repeat))
    timings = []
    for r, t_first, times in zip(runners, first, seconds):
        steady = statistics.median(times) * r.first_samples / r.samples
        timings.append(
            Timing(workload_name, r.framework, r.note, times, r.samples, t_first, t_first - steady)
        )
    return timings
