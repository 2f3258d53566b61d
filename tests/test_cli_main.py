"""The main job's table, at tiny budgets."""

from fml import report
from fml.cli import main


def test_main_job_writes_the_table(tmp_path, capsys):
    assert main(["main", "--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    out = capsys.readouterr().out
    assert table.strip() in out
    rows = [r for r in table.splitlines()[2:]]
    assert len(rows) == 7
    # the closed-form row is exact at any budget: fml's R² equals scikit-learn's
    closed = next(r for r in rows if "closed form" in r).split("|")
    assert abs(float(closed[4]) - float(closed[5])) < 1e-3
    # every classifier beats chance even at a tenth of the budget
    for row in rows:
        cells = row.split("|")
        if cells[3].strip() == "accuracy":
            assert float(cells[4]) > (0.6 if "breast" in cells[2] else 0.2), row
    assert report.MNIST1D_PAPER["cnn"] == 0.94
