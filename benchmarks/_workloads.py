"""The benchmark's workloads: one model, batch size and synthetic data set each,
built identically in every framework."""

from typing import NamedTuple

import numpy as np

from fml import models
from fml.models import presets


class Workload(NamedTuple):
    """One model trained with float32 Adam (lr 1e-3) on softmax cross-entropy.

    Attributes:
      name: "mlp", "cnn", "lstm" or "logistic".
      input_shape: one example's shape, channels-last.
      batch_size: examples per step.
      steps: batches in the synthetic data set (one fused epoch).
      passes: epochs per timed repeat (so a repeat lasts long enough to time).
      forward_flops: multiply-adds x 2 of one example's forward pass.
    """

    name: str
    input_shape: tuple
    batch_size: int
    steps: int
    passes: int
    forward_flops: int

    @property
    def samples_per_repeat(self) -> int:
        return self.steps * self.passes * self.batch_size

    @property
    def train_flops(self) -> int:
        """Forward + backward of one example: 3x the forward (the usual convention)."""
        return 3 * self.forward_flops


NUM_CLASSES = 10
LSTM_HIDDEN = 128


def _lstm_flops(steps: int, features: int, hidden: int) -> int:
    return steps * 2 * 4 * hidden * (features + hidden) + 2 * hidden * NUM_CLASSES


WORKLOADS = {
    "mlp": Workload("mlp", (784,), 128, 100, 2, 2 * (784 * 128 + 128 * 10)),
    "cnn": Workload(
        "cnn", (28, 28, 1), 128, 16, 1, 2 * (26 * 26 * 32 * 9 + 13 * 13 * 32 * 128 + 128 * 10)
    ),
    "lstm": Workload("lstm", (28, 28), 128, 16, 1, _lstm_flops(28, 28, LSTM_HIDDEN)),
    "logistic": Workload("logistic", (784,), 1024, 25, 4, 2 * 784 * 10),
}


def shrink(workload: Workload) -> Workload:
    """A smoke-test version: 2 batches, one pass."""
    return workload._replace(steps=2, passes=1)


def fml_model(workload: Workload):
    """The fml `Model` of a workload."""
    if workload.name == "mlp":
        return models.mlp([128, NUM_CLASSES])
    if workload.name == "cnn":
        return presets.mnist_cnn(NUM_CLASSES)
    if workload.name == "lstm":
        return models.rnn("lstm", LSTM_HIDDEN, num_classes=NUM_CLASSES)
    return models.logistic_regression(NUM_CLASSES)


def synthetic_data(workload: Workload, seed: int = 0):
    """`(x [N, *input_shape] float32, y [N] int32)` with `N = steps * batch_size`."""
    rng = np.random.default_rng(seed)
    n = workload.steps * workload.batch_size
    x = rng.standard_normal((n, *workload.input_shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return x, y
