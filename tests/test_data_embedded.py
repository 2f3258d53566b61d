"""Embedded data sets: what the loaders return, checked against their sources."""

import numpy as np
import pytest
import sklearn.datasets

import fml


def test_mnist1d_is_the_papers_default_dataset():
    data = fml.data.load("mnist1d")
    assert data.x_train.shape == (4000, 40, 1) and data.x_test.shape == (1000, 40, 1)
    assert data.num_classes == 10 and data.task == "classification"
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    from mnist1d.data import get_dataset_args, make_dataset

    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(data.x_test[..., 0], reference["x_test"], rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, reference["y"])


def test_digits_are_8x8_images_in_unit_range():
    data = fml.data.load("digits")
    assert data.input_shape == (8, 8, 1)
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert len(data.x_train) + len(data.x_test) == 1797


def test_standardisation_is_fitted_on_train_only():
    data = fml.data.load("breast_cancer")
    np.testing.assert_allclose(data.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(0), 1, atol=1e-4)
    assert np.abs(data.x_test.mean(0)).max() > 1e-3  # test set is only transformed
    raw = sklearn.datasets.load_breast_cancer().data
    assert len(data.x_train) + len(data.x_test) == len(raw)


@pytest.mark.parametrize(
    "name,n,task,classes",
    [
        ("iris", 150, "classification", 3),
        ("wine", 178, "classification", 3),
        ("diabetes", 442, "regression", None),
        ("breast_cancer", 569, "classification", 2),
    ],
)
def test_sklearn_sets_split_80_20(name, n, task, classes):
    data = fml.data.load(name, validation=0.25)
    assert len(data.x_test) == int(np.ceil(0.2 * n))
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == n
    assert data.task == task and data.num_classes == classes
    if task == "classification":  # stratified
        assert set(np.unique(data.y_val)) == set(range(classes))
