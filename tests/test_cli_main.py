"""The main job (the MNIST-1D table), at tiny budgets."""

from fml import report
from fml.cli import main


def test_main_job_writes_the_table(tmp_path, capsys):
    assert main(["main", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "table.md").read_text()
    out = capsys.readouterr().out
    device, _, table = text.partition("\n\n")
    assert device.startswith("Device: CPU") and table.strip() in out
    assert f"table written to {tmp_path / 'table.md'}" in out
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(report.ENTRIES) + len(report.SHUFFLED_ENTRIES)
    papers = {}
    for row in rows:  # every family beats chance (10%) even at a tenth of the budget
        label, dataset, accuracy, paper = (c.strip() for c in row.split("|")[1:5])
        assert float(accuracy.split(" ± ")[0]) > 15.0, row
        assert (tmp_path / dataset / label / "seed_0" / "curves.png").exists()
        papers[(dataset == "mnist1d", label)] = paper
    # The paper column holds Greydanus & Kobak's figures (MNIST-1D, Table 1 and the
    # shuffled-sequence ones), "–" for the models the paper does not report.
    assert papers == {
        (True, "logistic_regression"): "32", (True, "mlp"): "68", (True, "cnn"): "94",
        (True, "gru"): "91", (True, "lstm"): "–", (True, "svm"): "–",
        (False, "cnn"): "56", (False, "gru"): "57",
    }  # fmt: skip
