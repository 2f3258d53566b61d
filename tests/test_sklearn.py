"""scikit-learn estimators over fml: scikit-learn's own estimator checks, the
scikit-learn clients (Pipeline, cross_val_score, GridSearchCV) against
scikit-learn's own models, pickle and clone round trips, and FmlSearchCV."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from fml.sklearn import FmlClassifier, FmlRegressor

# Fast configurations for scikit-learn's checks (each check fits several times).
CHECKED = [
    FmlClassifier("logistic_regression", learning_rate=0.05, epochs=10, fused=False),
    FmlRegressor("linear_regression", learning_rate=0.05, epochs=10, fused=False),
]


@parametrize_with_checks(CHECKED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
