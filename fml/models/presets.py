"""Named architectures, composed in one place."""

from fml.models._cnn import cnn, conv, dense, max_pool
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
    """MNIST-1D MLP: 40-256-256-10, ReLU."""
    return mlp([256, 256, num_classes])


def mnist1d_cnn(num_classes: int = 10):
    """MNIST-1D 1D CNN: three 5-wide conv layers of 32 channels, two 2x max-pools."""
    return cnn(
        [conv(32, 5), max_pool(2), conv(32, 5), max_pool(2), conv(32, 5), dense(128)], num_classes
    )


def mnist1d_gru(num_classes: int = 10):
    """MNIST-1D GRU: one layer of 64 hidden units, classifier on the final state."""
    return rnn("gru", 64, num_classes=num_classes)


PRESETS = {f.__name__: f for f in (mnist_cnn, cifar_cnn, mnist1d_mlp, mnist1d_cnn, mnist1d_gru)}
