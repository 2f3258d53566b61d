"""Time to the MNIST-1D paper's accuracy per family, with `fml.fit` and the
main job's settings, one epoch per call (compiled programs are reused)."""

import time
from typing import NamedTuple

from experiments.mnist1d_report import MNIST1D_PAPER
from fml import data as data_lib
from fml import models, train
from fml.models import presets


class TimeToAccuracy(NamedTuple):
    family: str
    target: float
    reached: float  # best test accuracy seen
    epochs: int
    seconds: float  # wall time until the target, compile and per-epoch test included


# family -> (model factory, fit settings); the main job's (experiments/mnist1d_report.py).
FAMILIES = {
    "logistic_regression": (
        lambda: models.logistic_regression(10),
        {"learning_rate": 1e-2, "fused": True},
    ),
    "mlp": (presets.mnist1d_mlp, {"learning_rate": 1e-3, "fused": True}),
    "cnn": (presets.mnist1d_cnn, {"learning_rate": 2e-3, "fused": False}),
    "gru": (presets.mnist1d_gru, {"learning_rate": 3e-3, "fused": True}),
}


def time_to_accuracy(family: str, max_epochs: int = 60) -> TimeToAccuracy:
    """Trains until the test accuracy reaches the paper's figure (or `max_epochs`)."""
    make_model, settings = FAMILIES[family]
    dataset = data_lib.load("mnist1d")
    model, target = make_model(), MNIST1D_PAPER[family]
    state, best, epoch = None, 0.0, 0
    started = time.perf_counter()
    while best < target and epoch < max_epochs:
        state, history = train.fit(
            model, dataset, epochs=1, batch_size=100, state=state, quiet=True, **settings
        )
        best, epoch = max(best, history["test"]["accuracy"]), epoch + 1
    return TimeToAccuracy(family, target, best, epoch, time.perf_counter() - started)


def all_families(quick: bool = False, log=print) -> list[TimeToAccuracy]:
    results = []
    for family in FAMILIES:
        log(f"[bench] time to accuracy: {family}")
        results.append(time_to_accuracy(family, max_epochs=1 if quick else 60))
    return results
