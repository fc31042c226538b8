"""bench/static_memory.py: the committed table (quoted in the README) is what the current code allocates."""

import json
from pathlib import Path

import pytest

from eco_bench import static_memory

COMMITTED = Path(__file__).resolve().parents[1] / "bench" / "results" / "static_memory.json"


def test_committed_static_memory_table_matches_the_code(tmp_path):
    result = static_memory.main(["--out", str(tmp_path / "static")])
    committed = json.loads(COMMITTED.read_text())
    assert [r["arm"] for r in result["rows"]] == [r["arm"] for r in committed["rows"]]
    for row, saved in zip(result["rows"], committed["rows"], strict=True):
        assert row["columns"] == pytest.approx(saved["columns"]), row["arm"]
        assert row["bytes_per_param"] == pytest.approx(saved["bytes_per_param"]), row["arm"]
    assert (tmp_path / "static.md").read_text().count("\n| ") == len(result["rows"]) + 1
