"""The benchmark's smoke budget end to end (every row, tiny real subsets), and its resume."""
import json

from slimcnn.bench import ROWS, run_bench, split_epochs
from conftest import CIFAR, WEIGHTS


def test_split_epochs():
    assert split_epochs(2, 0.0) == (0, 2) and split_epochs(2, 1.0) == (2, 0) and split_epochs(1, 0.5) == (1, 0)
    assert split_epochs(4, 0.5) == (2, 2)


def test_smoke_budget_every_row(tmp_path):
    result = run_bench(str(CIFAR), str(WEIGHTS), "smoke", name="smoke-test", work=str(tmp_path / "work"),
                       results=str(tmp_path / "results"))
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {r.label for r in ROWS}
    for r in rows.values():
        assert 0.45 <= r["macs_ratio"] <= 0.55, r  # every row at the same MACs target
        assert r["test_images"] == 200 and 0 <= r["top1"] <= 100
        assert r["method_epochs"] + r["finetune_epochs"] == 1  # the same epoch budget for each
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "results" / f"smoke-test{suffix}").is_file()
    # a second call finds every row measured and runs nothing again
    again = run_bench(str(CIFAR), str(WEIGHTS), "smoke", name="smoke-test", work=str(tmp_path / "work"),
                      results=str(tmp_path / "results"))
    assert [r["wall_s"] for r in again["rows"]] == [r["wall_s"] for r in result["rows"]]
    assert json.loads((tmp_path / "results" / "smoke-test.json").read_text())["budget"] == "smoke"
