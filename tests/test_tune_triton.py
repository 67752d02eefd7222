"""The tile tuner runs end to end (interpreter, tiny shapes) and writes a table the launchers can read."""
import json

import pytest

pytest.importorskip("triton")


def test_dry_run_writes_a_readable_tile_table(tmp_path):
    from benchmarks import tune_triton
    from routedlora.ops import triton_backend as tb

    assert tune_triton.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    table = json.loads(path.read_text())
    default = tb.tile_table(None)
    assert list(table["classes"]) == list(default["classes"])
    for name, cfg in table["classes"].items():
        assert cfg["max_tokens"] == default["classes"][name]["max_tokens"]
        assert {"BLOCK_N", "BLOCK_D", "BLOCK_O", "BLOCK_W", "num_warps", "num_stages"} <= set(cfg)
    assert [tb.shape_class(n, table) for n in (1, 64, 65, 4096, 65536)] == ["decode", "decode", "medium", "medium",
                                                                           "train"]
