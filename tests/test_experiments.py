"""Experiments: the seed examples, the MNIST-1D table at reduced budget, and the
scikit-learn parity rows with scikit-learn trained in the loop."""

import json

import numpy as np
import pytest

from experiments import mnist1d_report as report
from experiments import seed_examples, tables
from experiments import sklearn_parity as parity
from fml import experiment
from fml.errors import ConfigError, UnknownNameError

# ------------------------------------------------------------------ seed examples


def test_line_recovers_slope_and_intercept(tmp_path):
    example = seed_examples.line(tmp_path)
    run = json.loads((example.run_dir / "history.json").read_text())
    assert run["val_loss"][-1] < 0.02  # the noise variance is 0.01
    params = np.load(example.run_dir / "params.npz")
    np.testing.assert_allclose(params["dense/w"][0, 0], 2.0, atol=0.05)
    np.testing.assert_allclose(params["dense/b"][0], 1.0, atol=0.05)
    assert "yes" in example.check


def test_plane_matches_least_squares(tmp_path):
    x, y = seed_examples.plane_data()
    example = seed_examples.plane(tmp_path)
    params = np.load(example.run_dir / "params.npz")
    design = np.c_[x, np.ones(len(x))][: int(0.8 * len(x))]  # fit's 80% train split
    exact = np.linalg.lstsq(design, y[: len(design)], rcond=None)[0]
    got = np.r_[params["dense/w"][:, 0], params["dense/b"]]
    np.testing.assert_allclose(got, exact, atol=0.02)


@pytest.mark.parametrize("example", [seed_examples.mnist_mlp, seed_examples.mnist_cnn])
def test_mnist_examples_use_real_digits_beside_pytorch(example, tmp_path):
    lines = []
    row = example(tmp_path, scale=0.2, log=lines.append)
    config = json.loads((row.run_dir / "config.json").read_text())
    if config["dataset"] != config["dataset_requested"]:  # no TFDS data on this machine
        assert config["dataset"] == "mnist5k" and config["input_shape"] == [28, 28, 1]
        assert "fallback" in row.data and any("using embedded 'mnist5k'" in s for s in lines)
    ours, theirs = (float(part.split()[-1]) for part in row.result.split(";"))
    assert ours > 0.85 and theirs > 0.85  # ten classes: chance is 0.1
    assert abs(ours - theirs) < 0.05  # the same model and settings in PyTorch
    assert (row.run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cifar_example_falls_back_and_says_so(tmp_path):
    lines = []
    row = seed_examples.cifar_cnn(tmp_path, scale=0.2, log=lines.append)
    config = json.loads((row.run_dir / "config.json").read_text())
    if config["dataset"] != config["dataset_requested"]:
        assert config["dataset"] == "digits"
        assert "fallback" in row.data and any("using embedded 'digits'" in s for s in lines)
    assert float(row.result.split()[-1]) > 0.3


def test_seed_table_writes_markdown(tmp_path):
    examples = [seed_examples.line(tmp_path, scale=0.1), seed_examples.soft_margin_svm(tmp_path)]
    svm = examples[1]
    assert float(svm.result.split()[-1]) >= seed_examples.MIN_ACCURACY
    table = seed_examples.markdown(examples)
    assert table.count("\n") == 3 and "breast_cancer" in table


# ------------------------------------------------------------------ MNIST-1D

# Reduced budgets (fractions of each recipe's epochs) and what they must reach on
# the 1000 test examples; chance is 10%.
REDUCED = {
    "logistic_regression": (0.3, 0.28),
    "svm": (0.3, 0.22),
    "mlp": (0.15, 0.45),
    "cnn": (0.15, 0.70),
    "gru": (0.2, 0.45),
    "lstm": (0.2, 0.35),
}


@pytest.fixture(scope="module")
def mnist1d_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist1d")
    rows = []
    for entry in report.ENTRIES:
        scale, _ = REDUCED[entry.label]
        rows += report.table_rows(out, [entry], seeds=(0,), scale=scale)
    return out, rows


@pytest.mark.parametrize("label", list(REDUCED))
def test_mnist1d_family_learns(mnist1d_rows, label):
    _, rows = mnist1d_rows
    (row,) = [r for r in rows if r.label == label]
    assert row.accuracies[0] >= REDUCED[label][1]
    run_dir = row.run_dirs[0]
    saved = json.loads((run_dir / "history.json").read_text())["test"]["accuracy"]
    assert saved == row.accuracies[0]
    assert experiment.evaluate_run(run_dir)["accuracy"] == saved


def test_mnist1d_table_markdown(mnist1d_rows):
    out, rows = mnist1d_rows
    table = report.markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(report.ENTRIES)
    cnn = [line for line in lines if line.startswith("| cnn ")][0]
    mean = 100 * rows[[r.label for r in rows].index("cnn")].accuracies[0]
    assert f"{mean:.1f} ± 0.0" in cnn and "| 94 |" in cnn
    (cnn_row,) = [r for r in rows if r.label == "cnn"]
    assert 0.5 < cnn_row.pytorch[0] <= 1.0  # the paper's ConvBase, 15% of its 8000 steps
    assert f"| {100 * cnn_row.pytorch[0]:.1f} ± 0.0 |" in cnn
    assert all(r.pytorch is None for r in rows if r.label != "cnn")
    path = tables.save_table(table, out)
    assert path.read_text().startswith("Device: CPU")


def test_goal_column_states_shortfalls():
    row = report.TableRow("cnn", "mnist1d", [0.93, 0.95], [1.0, 1.0], 0.94, 0.95, [])
    assert report._goal(row) == "paper met; stretch short by 1.0 pts"
    low = row._replace(accuracies=[0.90, 0.91])
    assert report._goal(low) == "**below paper by 3.5 pts**"
    beaten = row._replace(pytorch=[0.95, 0.96])
    assert report._goal(beaten) == "paper met; **below PyTorch by 1.5 pts**"


def test_recipes_reject_what_they_cannot_build():
    with pytest.raises(UnknownNameError, match="model family"):
        experiment.make_config("transformer", "mnist1d")
    with pytest.raises(ConfigError, match="no linear_regression recipe"):
        experiment.make_config("linear_regression", "mnist1d")
    with pytest.raises(ConfigError, match="unknown config keys"):
        experiment.make_config("mlp", "mnist1d", lr=0.1)


# ------------------------------------------------------------------ scikit-learn parity


@pytest.mark.parametrize("case", parity.cases(), ids=lambda c: c.slug)
def test_sklearn_parity(case, tmp_path):
    result = parity.run_case(case, tmp_path)
    assert result.met, (result.fml, result.sklearn)
    if case.criterion == "at_least":
        assert result.fml >= result.sklearn - case.tolerance
    else:
        assert abs(result.fml - result.sklearn) <= case.tolerance
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["sklearn"][result.metric] == result.sklearn
