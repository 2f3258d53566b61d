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


# ------------------------------------------------------------------ scikit-learn clients


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def _scaled(estimator):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), estimator)


def test_cross_val_score_on_digits_matches_logistic_regression(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x, y = digits
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    C, n_train = 1.0, len(x) * 2 // 3
    # Solved to its optimum (at its default tol=1e-4 lbfgs stops early, and by
    # chance classifies one more digit of the first fold: 0.9699 vs 0.9683).
    exact = LogisticRegression(C=C, max_iter=5000, tol=1e-8)
    sk = cross_val_score(_scaled(exact), x, y, cv=cv)
    # the same objective: LogisticRegression's divided by C n is mean loss + ||w||² / (2 C n)
    ours = FmlClassifier("logistic_regression", optimizer="lbfgs", epochs=300, l2=1 / (C * n_train))
    fml_scores = cross_val_score(_scaled(ours), x, y, cv=cv)
    assert fml_scores.mean() >= sk.mean(), (fml_scores, sk)
    assert fml_scores.mean() > 0.96


def test_pipeline_mlp_on_digits_matches_mlp_classifier(digits):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    x, y = digits
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    settings = {"hidden_layer_sizes": (64,), "batch_size": 64}
    sk, ours = [], []
    for seed in range(3):  # one seed's mean of 3 folds moves by a digit or two per seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp = MLPClassifier(max_iter=30, random_state=seed, **settings)
            sk.append(cross_val_score(_scaled(mlp), x, y, cv=cv).mean())
        fml_mlp = FmlClassifier("mlp", epochs=30, seed=seed, **settings)
        ours.append(cross_val_score(_scaled(fml_mlp), x, y, cv=cv).mean())
    # measured: scikit-learn 0.9722 (0.9733, 0.9705, 0.9727), fml 0.9725 (0.9705, 0.9755, 0.9716)
    assert np.mean(ours) >= np.mean(sk), (ours, sk)
    assert np.mean(ours) > 0.965


def test_grid_search_on_diabetes_matches_ridge():
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    x, y = load_diabetes(return_X_y=True)
    cv = KFold(3, shuffle=True, random_state=0)
    alphas = [0.01, 0.1, 1.0]
    n_train = len(x) * 2 // 3
    ridge = GridSearchCV(Ridge(), {"alpha": alphas}, cv=cv).fit(x, y)
    # Ridge's objective divided by n: mean squared error + (alpha / n) ||w||²
    ours = GridSearchCV(
        FmlRegressor("linear_regression", optimizer="lbfgs", epochs=500),
        {"l2": [2 * a / n_train for a in alphas]},
        cv=cv,
    ).fit(x, y)
    np.testing.assert_allclose(
        ours.cv_results_["mean_test_score"], ridge.cv_results_["mean_test_score"], atol=1e-3
    )
    assert ours.best_index_ == ridge.best_index_
    assert ours.best_score_ >= ridge.best_score_ - 1e-4


# ------------------------------------------------------------------ pickle, clone, labels


def test_pickle_and_clone_round_trips_predict_identically(digits):
    x, y = digits
    labels = np.array(["zero", "one", "two", "three", "four", "5", "6", "7", "8", "nine"])[y]
    clf = FmlClassifier("mlp", hidden_layer_sizes=(32,), epochs=3, dropout=0.1).fit(x / 16, labels)
    assert list(clf.classes_) == sorted(set(labels)) and clf.n_features_in_ == 64
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict(x / 16), clf.predict(x / 16))
    np.testing.assert_array_equal(back.predict_proba(x / 16), clf.predict_proba(x / 16))
    refit = clone(clf).fit(x / 16, labels)
    np.testing.assert_array_equal(refit.predict_proba(x / 16), clf.predict_proba(x / 16))
    assert clf.score(x / 16, labels) > 0.85

    reg = FmlRegressor("mlp", hidden_layer_sizes=(16,), epochs=3).fit(x / 16, y.astype(float))
    back = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(back.predict(x / 16), reg.predict(x / 16))
    np.testing.assert_array_equal(
        clone(reg).fit(x / 16, y.astype(float)).predict(x), reg.predict(x)
    )


def test_non_contiguous_labels_and_partial_fit(digits):
    x, y = digits
    x = x / 16
    labels = y * 10 + 3  # 3, 13, ..., 93
    clf = FmlClassifier("logistic_regression", learning_rate=0.05, epochs=1, fused=False)
    whole = clone(clf).fit(x, labels)
    for _ in range(3):
        clf.partial_fit(x, labels, classes=np.unique(labels))
    np.testing.assert_array_equal(clf.classes_, np.arange(10) * 10 + 3)
    assert set(clf.predict(x)) <= set(clf.classes_)
    # the first partial_fit pass is fit's one epoch; two more passes fit better
    assert clf.score(x, labels) > whole.score(x, labels) - 0.01
    assert clf.score(x, labels) > 0.9
    with pytest.raises(ValueError, match="not among classes_"):
        clf.partial_fit(x[:5], np.full(5, 4))


# ------------------------------------------------------------------ FmlSearchCV


def test_search_picks_what_grid_search_picks_in_one_program(digits):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from fml.sklearn import FmlSearchCV

    x, y = digits
    x = x / 16
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    estimator = FmlClassifier("mlp", hidden_layer_sizes=(16,), epochs=4, batch_size=64)
    grid = {"learning_rate": [1e-3, 3e-3, 1e-2], "l2": [0.0, 1e-3], "seed": [0, 1]}
    ours = FmlSearchCV(estimator, grid, cv=cv).fit(x, y)
    theirs = GridSearchCV(estimator, grid, cv=cv).fit(x, y)
    assert len(ours.sweeps_) == 1 and ours.sweeps_[0].compiles == 1
    assert len(ours.sweeps_[0]) == 12 * 3  # every candidate on every fold, one program
    assert ours.best_params_ == theirs.best_params_
    for name in ("mean_test_score", "split0_test_score", "split2_test_score"):
        np.testing.assert_allclose(ours.cv_results_[name], theirs.cv_results_[name], atol=1e-3)
    np.testing.assert_array_equal(
        ours.cv_results_["rank_test_score"], theirs.cv_results_["rank_test_score"]
    )
    assert sorted(ours.cv_results_) == sorted(theirs.cv_results_)
    np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
    assert ours.score(x, y) == theirs.score(x, y)


def test_search_groups_static_settings_and_regresses():
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import GridSearchCV, KFold

    from fml.sklearn import FmlSearchCV

    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    cv = KFold(4, shuffle=True, random_state=0)
    estimator = FmlRegressor("mlp", epochs=5, batch_size=32)
    grid = {"hidden_layer_sizes": [(8,), (16,)], "learning_rate": [1e-3, 1e-2]}
    ours = FmlSearchCV(estimator, grid, cv=cv, return_train_score=True).fit(x, y)
    theirs = GridSearchCV(estimator, grid, cv=cv, return_train_score=True).fit(x, y)
    assert len(ours.sweeps_) == 2  # one program per hidden size
    assert ours.best_params_ == theirs.best_params_
    for name in ("mean_test_score", "mean_train_score"):
        np.testing.assert_allclose(ours.cv_results_[name], theirs.cv_results_[name], atol=1e-4)


def test_search_refuses_what_it_cannot_batch(digits):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fml.sklearn import FmlSearchCV

    x, y = digits
    with pytest.raises(ValueError, match="not a Pipeline"):
        FmlSearchCV(make_pipeline(StandardScaler(), FmlClassifier()), {}).fit(x, y)
    with pytest.raises(ValueError, match="minibatch optimizers"):
        FmlSearchCV(FmlClassifier(optimizer="lbfgs"), {"l2": [0.0]}, cv=2).fit(x, y)


def test_docstring_examples():
    import doctest

    import fml.sklearn

    result = doctest.testmod(fml.sklearn, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
