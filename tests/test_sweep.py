"""fml.sweep: every member equals the same configuration trained alone with fml.fit;
the step compiles once; the table, selection, ensemble, run directory and CLI."""

import csv

import jax
import numpy as np
import pytest

import fml
from fml import models, rundir
from fml.errors import ConfigError
from fml.sweep import grid

TOLERANCE = 1e-5


def _classification(n=60, t=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 30, t, 1)).astype(np.float32)
    y = (x[:, :3, 0].sum(1) > 0).astype(np.int32) + (x[:, -1, 0] > 1).astype(np.int32)
    y = np.minimum(y, classes - 1)
    return fml.data.Dataset(
        "toy", "classification", x[:n], y[:n], x[n + 15 :], y[n + 15 :], classes,
        x_val=x[n : n + 15], y_val=y[n : n + 15],
    )  # fmt: skip


def _regression(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 30, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=n + 30)).astype(np.float32)
    return fml.data.Dataset(
        "toy_reg", "regression", x[:n], y[:n], x[n + 15 :], y[n + 15 :],
        x_val=x[n : n + 15], y_val=y[n : n + 15],
    )  # fmt: skip


CASES = {
    # name: (model, data, swept axes, fused)
    "mlp_dropout_seeds_lr_step": (
        models.mlp([8, 3], dropout=0.2), _classification(), {"seeds": [0, 3], "learning_rate": [1e-2, 3e-2]}, False
    ),
    "mlp_dropout_seeds_lr_fused": (
        models.mlp([8, 3], dropout=0.2), _classification(), {"seeds": [0, 3], "learning_rate": [1e-2, 3e-2]}, True
    ),
    "svm_C_step": (models.svm(3), _classification(), {"seeds": 2, "C": [0.01, 10.0]}, False),
    "svm_C_fused": (models.svm(2), _classification(classes=2), {"C": [0.01, 0.3, 10.0]}, True),
    "logistic_lr_step": (models.logistic_regression(3), _classification(), {"learning_rate": [1e-2, 1e-1]}, False),
    "linear_l2_fused": (models.linear_regression(), _regression(), {"seeds": 2, "l2": [0.0, 0.5]}, True),
    "cnn_seeds_fused": (
        models.cnn([models.conv(4, 3), models.max_pool(2), models.dense(8)], 3), _classification(), {"seeds": 2}, True
    ),
    "rnn_seeds_step": (models.rnn("simple", 4, num_classes=3), _classification(), {"seeds": [1, 2]}, False),
}  # fmt: skip


def _alone(model, data, config, fused, **kwargs):
    """The member's configuration trained alone with fml.fit."""
    if "C" in config:
        model = models.from_spec({**model.spec, "C": config["C"]})
    state, history = fml.fit(
        model,
        data,
        seed=config["seed"],
        learning_rate=config["learning_rate"],
        l2=config.get("l2"),
        fused=fused,
        quiet=True,
        **kwargs,
    )
    return state, history


@pytest.mark.parametrize("name", list(CASES))
def test_every_member_matches_fit_alone(name):
    model, data, axes, fused = CASES[name]
    axes = {"learning_rate": 1e-2, **axes}
    result = fml.sweep(model, data, epochs=2, batch_size=16, fused=fused, **axes)
    assert result.compiles == 1
    seeds = axes.pop("seeds", 1)
    assert len(result) == len(grid(seed=range(seeds) if isinstance(seeds, int) else seeds, **axes))
    # The last member differs from the first in every swept value.
    for k in (len(result) - 1,):
        state, history = _alone(model, data, result.configs[k], fused, epochs=2, batch_size=16)
        member = result.member_state(k)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params, member.params)
        assert max(jax.tree.leaves(diffs)) <= TOLERANCE, diffs
        assert int(member.step) == int(state.step)
        np.testing.assert_allclose(
            result.history["train_loss"][:, k], history["train_loss"], rtol=1e-5
        )
        metric = result.metric
        np.testing.assert_allclose(
            result.table[k][f"test_{metric}"], history["test"][metric], atol=1e-6
        )
        np.testing.assert_allclose(result.table[k]["test_loss"], history["test"]["loss"], rtol=1e-5)


def test_weight_decay_sweep_matches_adamw_alone():
    model, data = models.mlp([8, 3]), _classification()
    result = fml.sweep(
        model,
        data,
        optimizer="adamw",
        weight_decay=[0.0, 0.5],
        learning_rate=3e-2,
        epochs=2,
        batch_size=16,
    )
    assert result.compiles == 1
    for k, decay in [(1, 0.5)]:
        state, _ = fml.fit(
            model, data, optimizer="adamw", learning_rate=3e-2, epochs=2, batch_size=16,
            optimizer_kwargs={"weight_decay": decay}, quiet=True,
        )  # fmt: skip
        np.testing.assert_allclose(
            result.member_state(k).params["dense_0"]["w"],
            state.params["dense_0"]["w"],
            atol=TOLERANCE,
        )
    assert not np.allclose(
        result.member_state(0).params["dense_0"]["w"], result.member_state(1).params["dense_0"]["w"]
    )


def test_compiles_once_over_epochs_and_values():
    """Twelve members with different seeds (so different batches), learning rates and C:
    one compiled step for all epochs; JAX's own compile log agrees."""
    data = _classification()
    with jax.log_compiles(True):
        result = fml.sweep(
            models.svm(3),
            data,
            seeds=3,
            learning_rate=[1e-3, 1e-2],
            C=[0.1, 1.0],
            epochs=3,
            batch_size=16,
        )
    assert len(result) == 12
    assert result.compiles == 1
    lrs = np.asarray(result.state.opt_state.hyperparams["learning_rate"])
    np.testing.assert_allclose(lrs, [c["learning_rate"] for c in result.configs])
    expected_l2 = [1.0 / (c["C"] * 60) for c in result.configs]
    np.testing.assert_allclose(np.asarray(result.state.hparams["l2"]), expected_l2, rtol=1e-6)


def test_table_selection_and_best_run_directory(tmp_path):
    data = _classification()
    result = fml.sweep(
        models.svm(3), data, seeds=2, C=[0.001, 1.0], learning_rate=3e-2, epochs=3, batch_size=16
    )
    val = np.array([row["val_accuracy"] for row in result.table])
    val_loss = np.array([row["val_loss"] for row in result.table])
    best_rows = np.flatnonzero(val == val.max())
    assert result.best == best_rows[np.argmin(val_loss[best_rows])]
    assert result.best_model.spec["C"] == result.best_config["C"]
    # Every member's table entry is fml.evaluate on its own params.
    for k in range(len(result)):
        own = fml.evaluate(
            result.member_model(k), result.member_state(k).params, data.x_val, data.y_val
        )
        np.testing.assert_allclose(result.table[k]["val_accuracy"], own["accuracy"], atol=1e-6)
    run_dir = result.save(tmp_path / "run", config={"dataset": "toy"})
    model, params, config = rundir.load_run(run_dir)
    assert model.spec == result.best_model.spec and config["seed"] == result.best_config["seed"]
    np.testing.assert_allclose(
        fml.predict(model, params, data.x_test),
        result.predict(data.x_test)[:, result.best],
        atol=1e-6,
    )
    with open(run_dir / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result)
    assert (run_dir / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "model, classes",
    [(models.logistic_regression(3), 3), (models.logistic_regression(2), 2), (models.svm(3), 3)],
    ids=["softmax", "sigmoid", "svm_scores"],
)
def test_ensemble_averages_member_probabilities(model, classes):
    data = _classification(classes=classes)
    result = fml.sweep(model, data, seeds=3, learning_rate=3e-2, epochs=2, batch_size=16)
    outputs = np.stack(
        [fml.predict(model, result.member_state(k).params, data.x_test) for k in range(3)]
    )
    if model.family == "svm":
        labels = outputs.mean(0).argmax(-1)
    elif classes == 2:
        labels = ((1 / (1 + np.exp(-outputs[..., 0]))).mean(0) > 0.5).astype(int)
    else:
        probs = np.exp(outputs - outputs.max(-1, keepdims=True))
        labels = (probs / probs.sum(-1, keepdims=True)).mean(0).argmax(-1)
    report = result.ensemble()
    np.testing.assert_allclose(
        report["test"]["accuracy"], np.mean(labels == data.y_test), atol=1e-6
    )
    members = [np.mean(fml.metrics.predict_labels(o) == data.y_test) for o in outputs]
    np.testing.assert_allclose(report["members_test"]["mean"], np.mean(members), atol=1e-6)
    assert result.ensemble(members=[1])["test"]["accuracy"] == pytest.approx(members[1])


def test_diverged_member_is_reported_and_never_selected():
    data = _regression()
    result = fml.sweep(
        models.linear_regression(),
        data,
        optimizer="sgd",
        learning_rate=[1e-2, 1e4],
        epochs=2,
        batch_size=16,
    )
    assert [row["diverged"] for row in result.table] == [False, True]
    assert result.best == 0


def test_configs_list_instead_of_grid():
    data = _classification()
    configs = [{"seed": 4, "learning_rate": 1e-2}, {"seed": 0, "C": 2.0}]
    result = fml.sweep(
        models.svm(3), data, configs=configs, C=1.0, learning_rate=3e-2, epochs=1, batch_size=16
    )
    assert result.configs == [
        {"seed": 4, "learning_rate": 1e-2, "C": 1.0},
        {"seed": 0, "learning_rate": 3e-2, "C": 2.0},
    ]


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (models.mlp([3]), {"C": [1.0]}, "C is the SVM"),
        (models.svm(3), {"C": [1.0], "l2": [0.1]}, "either C or l2"),
        (models.mlp([3]), {"weight_decay": [0.1]}, "weight_decay"),
        (models.mlp([3]), {"optimizer": "lbfgs"}, "minibatch optimizer"),
        (models.mlp([3]), {"learning_rate": []}, "at least one value"),
        (models.mlp([3]), {"seeds": 0}, "seeds >= 1"),
        (models.mlp([3]), {"epochs": 0}, "epochs to be an int >= 1"),
        (models.mlp([3]), {"learning_rate": [1e-2, -1.0]}, "learning_rate > 0"),
        (models.mlp([3]), {"configs": []}, "at least one configuration"),
    ],
)
def test_bad_sweeps_raise_config_error(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fml.sweep(model, _classification(), **{"epochs": 1, **kwargs})


def test_cli_writes_run_directory(tmp_path, capsys):
    from fml.cli import main

    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "logistic_regression",
        "--dataset",
        "iris",
        "--lr",
        "1e-2,1e-1",
        "--seeds",
        "2",
    ]
    assert main([*argv, "--epochs", "2", "--batch-size", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 4" in printed
    _, params, config = rundir.load_run(out)
    assert config["dataset"] == "iris" and config["sweep"]["members"] == 4
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({float(r["learning_rate"]) for r in rows}) == [1e-2, 1e-1]
    assert main(["sweep", "mlp", "--dataset", "diabetes", "--out", str(out)]) == 2


def test_docstring_examples():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["fml.sweep"], optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("fused", [False, True], ids=["host", "fused"])
def test_subset_members_match_fit_on_their_subsets(fused):
    # members on different subsets (64, 65 and 32 examples: 2, 3 and 1 steps of 32)
    # with their own seeds and learning rates end as fit on those examples alone
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    subsets = [rng.permutation(100)[:64], rng.permutation(100)[:65], np.arange(32)]
    configs = [
        {"seed": 0, "learning_rate": 1e-2},
        {"seed": 1, "learning_rate": 3e-2},
        {"seed": 2, "learning_rate": 1e-2},
    ]
    model = models.mlp([8, 3], dropout=0.1)
    settings = dict(epochs=3, batch_size=32, fused=fused)
    result = fml.sweep(model, (x, y), configs=configs, subsets=subsets, **settings)
    assert result.compiles == 1
    for k, (config, subset) in enumerate(zip(configs, subsets)):
        alone, history = fml.fit(model, (x[subset], y[subset]), quiet=True, **config, **settings)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=TOLERANCE),
            result.member_state(k).params,
            alone.params,
        )
        assert int(result.member_state(k).step) == int(alone.step)
        np.testing.assert_allclose(
            result.history["train_loss"][:, k], history["train_loss"], rtol=1e-5
        )
    with pytest.raises(ConfigError, match="one subset per member"):
        fml.sweep(model, (x, y), configs=configs, subsets=subsets[:2], **settings)
    with pytest.raises(ConfigError, match="indexes examples"):
        fml.sweep(model, (x, y), configs=configs[:1], subsets=[np.arange(95, 101)], **settings)
