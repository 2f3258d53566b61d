"""Run directories that behave (issue 16): one policy for an existing run, checked
before any training; default names that tell runs apart; a sweep that clears what it
replaces; `fml train --config RUN/config.json` re-runs a run exactly; plots and help
a person can use."""

import json
import struct

import numpy as np
import pytest

from fml import cli, experiment, rundir
from fml.errors import ConfigError

IRIS = ["train", "logistic_regression", "--dataset", "iris", "--epochs", "2", "--quiet"]


class Trained(Exception):
    """Raised by a stand-in `fit`: training would have started."""


def _no_training(*args, **kwargs):
    raise Trained


def test_existing_run_is_refused_before_training_naming_the_flags(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main([*IRIS, "--out", str(out)]) == 0
    params = (out / "params.npz").read_bytes()
    monkeypatch.setattr(experiment, "fit", _no_training)
    capsys.readouterr()
    assert cli.main([*IRIS, "--out", str(out)]) == 2  # no Trained: refused before fit
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "params.npz").read_bytes() == params
    with pytest.raises(Trained):  # --overwrite gets as far as training, the old run gone
        experiment.train_and_evaluate(experiment.make_config("svm", "iris"), out, overwrite=True)
    assert not (out / "params.npz").exists() and (out / "preprocessing.json").exists()


def test_overwrite_replaces_the_whole_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*IRIS, "--out", str(out)]) == 0
    (out / "export").mkdir()
    (out / "export" / "model.onnx").write_text("stale")
    assert cli.main([*IRIS, "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert not (out / "export").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        cli.main([*IRIS, "--out", str(tmp_path), "--resume", "--overwrite"])
    with pytest.raises(ConfigError, match="not both"):
        rundir.prepare(tmp_path, resume=True, overwrite=True)


def test_a_directory_without_a_run_is_used_as_it_is(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert rundir.prepare(tmp_path, overwrite=True) == tmp_path
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_default_names_tell_runs_apart():
    names = {
        experiment.run_name(experiment.make_config("rnn", "mnist1d", cell=cell))
        for cell in ("gru", "lstm", "simple")
    }
    assert names == {"rnn-gru-mnist1d-seed0", "rnn-lstm-mnist1d-seed0", "rnn-simple-mnist1d-seed0"}
    config = experiment.make_config(
        "mlp", "iris", learning_rate=0.05, batch_size=7, seed=2, epochs=99, validation=0.2
    )
    assert experiment.run_name(config) == "mlp-iris-lr0.05-bs7-val0.2-seed2"  # not the epochs
    fallback = {**experiment.make_config("mlp", "mnist"), "dataset": "digits",
                "dataset_requested": "mnist"}  # fmt: skip
    assert experiment.run_name(fallback) == "mlp-digits-for-mnist-seed0"


def test_default_run_directory_uses_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*IRIS, "--lr", "0.1"]) == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [
        "logistic_regression-iris-lr0.1-seed0"
    ]


def test_sweep_refuses_then_clears_what_it_replaces(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "logistic_regression", "--dataset", "iris", "--lr", "1e-2,1e-1",
            "--epochs", "1", "--batch-size", "16", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    (out / "export").mkdir()
    (out / "export" / "model.onnx").write_text("stale: the previous best member")
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "export").exists() and (out / "preprocessing.json").exists()


def test_sweep_and_train_spell_families_alike(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "rnn", "--cell", "lstm", "--dataset", "mnist1d", "--epochs", "1",
            "--batch-size", "500", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    model, _, config = rundir.load_run(out)
    assert (model.spec["family"], model.spec["cell"], config["cell"]) == ("rnn", "lstm", "lstm")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sweep", "gru"])


def test_config_file_reruns_the_run_exactly(tmp_path):
    first, again, longer = tmp_path / "first", tmp_path / "again", tmp_path / "longer"
    argv = [*IRIS, "--lr", "0.05", "--seed", "4", "--batch-size", "8"]
    assert cli.main([*argv, "--out", str(first)]) == 0
    config = str(first / "config.json")
    assert cli.main(["train", "--config", config, "--quiet", "--out", str(again)]) == 0
    with np.load(first / "params.npz") as a, np.load(again / "params.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    assert cli.main(["train", "--config", config, "--epochs", "3", "--quiet",
                     "--out", str(longer)]) == 0  # fmt: skip
    saved = json.loads((longer / "config.json").read_text())
    assert (saved["epochs"], saved["seed"], saved["learning_rate"]) == (3, 4, 0.05)


def test_config_file_errors(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "no config file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert cli.main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    assert "not a JSON config" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "iris"]) == 2
    assert "needs a family" in capsys.readouterr().err


def test_preprocessing_is_saved_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "fit", _no_training)
    with pytest.raises(Trained):
        experiment.train_and_evaluate(experiment.make_config("mlp", "wine"), tmp_path / "run")
    block = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert block["raw_shape"] == [13] and [s["op"] for s in block["steps"]] == ["standardize"]


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_curves_are_readable(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*IRIS, "--out", str(out)]) == 0
    width, height = _png_size(out / "curves.png")
    assert (width, height) == (int(2 * 4.2 * 150), int(3.2 * 150))  # two panels at 150 dpi


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "fml 0.1.0"
    for command in ("train", "eval", "predict", "sweep", "export"):
        with pytest.raises(SystemExit):
            cli.main([command, "-h"])
        text = capsys.readouterr().out
        assert "fml." not in text and "presets" not in text, (command, text)


def test_curves_number_epochs_as_the_csv_on_integer_ticks():
    from fml import plots

    history = {"epoch": [0, 1, 2], "train_loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.7, 0.6],
               "train_accuracy": [0.5, 0.7, 0.8], "test": {"accuracy": 0.75}}  # fmt: skip
    figure = plots.curves_figure(history, loss_name="softmax_cross_entropy")
    loss, accuracy = figure.axes
    assert (
        loss.get_ylabel() == "loss (softmax cross entropy)" and accuracy.get_ylabel() == "accuracy"
    )
    np.testing.assert_array_equal(loss.lines[0].get_xdata(), [0, 1, 2])
    figure.canvas.draw()
    ticks = [t for t in loss.get_xticks() if loss.get_xlim()[0] <= t <= loss.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
