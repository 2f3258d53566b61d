"""`fml` alone prints help; the README's main command (the MNIST-1D table) at tiny budgets."""

import subprocess
import sys

from experiments import mnist1d_report, mnist1d_table
from fml.cli import build_parser, main


def test_fml_alone_prints_help_and_starts_nothing(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fml") and "train" in out
    commands = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    assert {"train", "eval", "sweep", "export"} <= commands
    assert not {"main", "bench"} & commands


def test_fml_version():
    done = subprocess.run(
        [sys.executable, "-m", "fml", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "fml 0.1.0"


def test_mnist1d_table_script_writes_the_table(tmp_path, capsys):
    rows = mnist1d_table.main(["--seeds", "0", "--scale", "0.1", "--out", str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    out = capsys.readouterr().out
    device, _, table = text.partition("\n\n")
    assert device.startswith("Device: CPU") and table.strip() in out
    assert f"table written to {tmp_path / 'table.md'}" in out
    lines = table.strip().splitlines()[2:]
    assert (
        len(lines)
        == len(rows)
        == len(mnist1d_report.ENTRIES) + len(mnist1d_report.SHUFFLED_ENTRIES)
    )
    papers = {}
    for line in lines:  # every family beats chance (10%) even at a tenth of the budget
        label, dataset, accuracy, paper = (c.strip() for c in line.split("|")[1:5])
        assert float(accuracy.split(" ± ")[0]) > 15.0, line
        assert (tmp_path / dataset / label / "seed_0" / "curves.png").exists()
        papers[(dataset == "mnist1d", label)] = paper
    # The paper column holds Greydanus & Kobak's figures (MNIST-1D, Table 1 and the
    # shuffled-sequence ones), "–" for the models the paper does not report.
    assert papers == {
        (True, "logistic_regression"): "32", (True, "mlp"): "68", (True, "cnn"): "94",
        (True, "gru"): "91", (True, "lstm"): "–", (True, "svm"): "–",
        (False, "cnn"): "56", (False, "gru"): "57",
    }  # fmt: skip
