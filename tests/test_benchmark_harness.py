"""The benchmark harness runs end to end on the CPU and writes what it promises.

No timing is asserted: only that every peer ran, computed the same function as
routedlora's reference, and that the JSON, table and plots were written.
"""
import json

from benchmarks import run
from benchmarks.peers import SAME_FUNCTION


def test_quick_run_writes_json_table_and_plots(tmp_path, capsys):
    assert run.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CPU TIMINGS" in out
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert result["env"]["profile"] == "cpu" and result["env"]["torch"]
    layer = [r for r in result["rows"] if r["level"] == "layer"]
    peers = {r["peer"] for r in layer if "median_ms" in r}
    assert {"base", "peft_poly", "per_task_loop", "dense_einsum", "routedlora[torch]"} <= peers
    for r in layer:
        if r["peer"] in SAME_FUNCTION and r.get("rel_err_vs_reference") is not None:
            assert r["rel_err_vs_reference"] < 1e-5, r
        if "median_ms" in r:
            assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
            assert r["x_base"] is not None
    model = [r for r in result["rows"] if r["level"] == "model" and "tokens_per_s" in r]
    assert {(r["peer"], r["mode"]) for r in model} >= {("routedlora[torch]", "train"), ("peft_poly", "train"),
                                                      ("routedlora[torch]", "generate")}
    md = json_path.with_suffix(".md").read_text()
    assert "## Layer" in md and "| routedlora[torch] |" in md and "## Model" in md
    assert list(tmp_path.glob("*.png"))


def test_grouping_suite_runs_and_reports(tmp_path):
    assert run.main(["--only", "grouping", "--device", "cpu", "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("*.md")).read_text()
    assert "Routing metadata" in md and "torch sort chain" in md
