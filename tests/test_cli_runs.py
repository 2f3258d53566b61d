"""`fml train` writes the run-directory layout; `fml eval` reproduces its test metrics."""

import csv
import json
import math

import pytest

from fml import cli, experiment, rundir
from fml.errors import UnknownNameError

LAYOUT = {
    "config.json", "spec.json", "preprocessing.json", "params.npz", "history.json",
    "history.csv", "curves.png",
}  # fmt: skip


def _train(tmp_path, *args):
    out = tmp_path / "run"
    assert cli.main(["train", *args, "--out", str(out)]) == 0
    return out


def _eval(capsys, *args):
    capsys.readouterr()
    code = cli.main(["eval", *map(str, args)])
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "args",
    [
        ["logistic_regression", "--dataset", "breast_cancer", "--epochs", "3"],
        ["cnn", "--dataset", "digits", "--epochs", "1", "--optimizer", "momentum", "--lr", "0.01"],
        [
            "rnn",
            "--dataset",
            "mnist1d",
            "--cell",
            "lstm",
            "--epochs",
            "1",
            "--batch-size",
            "500",
            "--seed",
            "3",
        ],
    ],
    ids=["logistic", "cnn", "lstm"],
)
def test_train_writes_layout_and_eval_reproduces_it(args, tmp_path, capsys):
    run = _train(tmp_path, *args)
    assert {p.name for p in run.iterdir()} == LAYOUT | {"checkpoints"}  # `fml train` checkpoints
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    history = json.loads((run / "history.json").read_text())
    epochs = int(args[args.index("--epochs") + 1])
    assert config["family"] == args[0] and config["epochs"] == epochs
    assert len(history["train_loss"]) == len(history["val_loss"]) == epochs
    with open(run / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == epochs
    model, _, _ = rundir.load_run(run)
    assert model.spec["family"] == args[0]
    if "--cell" in args:
        assert model.spec["cell"] == "lstm" and config["seed"] == 3
    code, out = _eval(capsys, run)
    assert code == 0
    assert json.loads(out.out) == history["test"]  # exactly, not approximately


def test_train_overrides_reach_the_config(tmp_path):
    run = _train(
        tmp_path, "mlp", "--dataset", "iris", "--epochs", "2", "--batch-size", "16",
        "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01", "--validation", "0.2",
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["optimizer"], config["learning_rate"]) == (
        16,
        "adamw",
        0.003,
    )
    assert config["weight_decay"] == 0.01 and config["validation"] == 0.2
    history = json.loads((run / "history.json").read_text())
    assert len(history["val_accuracy"]) == 2


def test_unavailable_dataset_is_an_error_that_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # nothing prepared there
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "mlp", "--dataset", "mnist", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "tfds build mnist" in err and "--fallback mnist5k" in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_fallback_only_when_asked_and_named_in_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "mlp", "--dataset", "mnist", "--fallback", "digits", "--epochs", "1"]
    assert cli.main([*argv, "--quiet"]) == 0
    assert "using embedded 'digits' instead" in capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name == "mlp-digits-for-mnist-seed0"
    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["dataset_requested"]) == ("digits", "mnist")


def test_eval_errors_are_clear(tmp_path, capsys):
    code, out = _eval(capsys, tmp_path / "missing")
    assert code == 2 and "does not exist" in out.err
    run = _train(tmp_path, "logistic_regression", "--dataset", "iris", "--epochs", "1")
    code, out = _eval(capsys, run, "--dataset", "wine")
    assert code == 2 and "expects inputs of shape (4,)" in out.err
    assert cli.main(["train", "svm", "--dataset", "no_such_set"]) == 2
    assert "unknown data set 'no_such_set'" in capsys.readouterr().err


def test_train_resume_continues_to_the_uninterrupted_params(tmp_path):
    """`fml train` checkpoints every epoch; `--resume` with more epochs ends where one
    uninterrupted run of that many epochs ends, bit for bit."""
    import numpy as np

    from fml.cli import main

    common = ["train", "logistic_regression", "--dataset", "iris", "--lr", "0.05"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main([*common, "--epochs", "2", "--out", str(resumed)]) == 0
    assert main([*common, "--epochs", "5", "--out", str(resumed), "--resume"]) == 0
    assert main([*common, "--epochs", "5", "--out", str(straight)]) == 0
    with np.load(resumed / "params.npz") as a, np.load(straight / "params.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    history = json.loads((resumed / "history.json").read_text())
    assert history["epoch"] == [0, 1, 2, 3, 4]


def test_cosine_schedule_reaches_the_run_and_decays_to_zero(tmp_path):
    run = _train(
        tmp_path, "logistic_regression", "--dataset", "iris", "--epochs", "3",
        "--batch-size", "16", "--lr", "0.02", "--schedule", "cosine", "--quiet",
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["schedule"] == "cosine" and experiment.run_name(config).endswith("cosine-seed0")
    # 3 epochs of ceil(108 / 16) = 7 steps; the rate of step t is 0.01 (1 + cos(pi t / 21)).
    steps = 3 * 7
    schedule = experiment.learning_rate(config, 108)
    for t in (0, 5, steps - 1, steps):
        assert schedule(t) == pytest.approx(0.01 * (1 + math.cos(math.pi * t / steps)), abs=1e-9)
    assert experiment.learning_rate({**config, "schedule": None}, 108) == 0.02
    # The run took those 21 steps: its last one (t = 20) at the schedule's rate.
    result = experiment.train_and_evaluate(
        experiment.make_config(**{k: config[k] for k in experiment.CONFIG_KEYS}),
        tmp_path / "again", quiet=True, log=lambda *_: None,
    )  # fmt: skip
    rate = result.state.opt_state.hyperparams["learning_rate"]
    assert int(result.state.step) == steps
    assert float(rate) == pytest.approx(0.01 * (1 + math.cos(math.pi * 20 / 21)), rel=1e-5)
    assert result.test == json.loads((run / "history.json").read_text())["test"]
    with pytest.raises(UnknownNameError, match="learning-rate schedule 'step'"):
        experiment.learning_rate({**config, "schedule": "step"}, 108)


class _Fitted(Exception):
    """Raised by a stand-in `fit`, carrying the keyword arguments it was given."""


def _record_fit(*args, **kwargs):
    raise _Fitted(kwargs)


def test_clip_norm_reaches_fit_and_names_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "fit", _record_fit)
    argv = ["train", "mlp", "--dataset", "iris", "--clip-norm", "0.5", "--out", str(tmp_path)]
    with pytest.raises(_Fitted) as fitted:
        cli.main(argv)
    assert fitted.value.args[0]["clip_norm"] == 0.5
    config = experiment.make_config("mlp", "iris", clip_norm=0.5)
    assert experiment.run_name(config) == "mlp-iris-clip0.5-seed0"
    # The shuffled-sequence GRU recipe clips at 1 and decays its rate along a cosine.
    recipe = experiment.make_config("rnn", "mnist1d_shuffled")
    assert (recipe["clip_norm"], recipe["schedule"]) == (1.0, "cosine")
    assert experiment.run_name(recipe) == "rnn-gru-mnist1d_shuffled-seed0"
