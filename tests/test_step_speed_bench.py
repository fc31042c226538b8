"""bench/step_speed.py on CPU: a tiny config end to end (compiled and eager arms, torch foreach), and its shapes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step_speed.py"


@pytest.fixture(scope="module")
def step_speed():
    spec = importlib.util.spec_from_file_location("step_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_config_has_every_expert_and_a_plain_router(step_speed):
    cfg = step_speed.CONFIGS["moe-small"]
    shapes = step_speed.weight_shapes(cfg)
    experts = [s for name, s, quantized in shapes if ".experts." in name]
    assert len(experts) == cfg["layers"] * cfg["experts"] * 3
    assert {tuple(s) for s in experts} == {(cfg["intermediate"], cfg["hidden"]), (cfg["hidden"], cfg["intermediate"])}
    routers = [(s, q) for name, s, q in shapes if name.endswith("router")]
    assert routers == [((cfg["experts"], cfg["hidden"]), False)] * cfg["layers"]
    dense = step_speed.weight_shapes(step_speed.CONFIGS["cpu-small"])
    assert not any(".experts." in name or "router" in name for name, _, _ in dense)


def test_tiny_run_times_every_cpu_arm_and_writes_json(step_speed, tmp_path, monkeypatch):
    tiny = dict(hidden=32, intermediate=64, layers=1, vocab=64, heads=2, kv_heads=1, experts=2)
    monkeypatch.setitem(step_speed.CONFIGS, "tiny", tiny)
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()  # the benchmark times one thread; give the other tests theirs back
    try:
        result = step_speed.main(["--device", "cpu", "--config", "tiny", "--runs", "2", "--warmup", "1",
                                  "--formats", "int4-group32", "--states", "bf16", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["config"] == "tiny" and saved["n_params"] == result["n_params"]
    arms = {row["arm"]: row for row in saved["rows"]}
    assert {"torch-foreach", "eco/int4-group32/bf16/compiled", "eco/int4-group32/bf16/reference"} <= set(arms)
    assert arms["torch-foreach"]["ratio_to_torch_foreach"] == 1.0
    for row in arms.values():
        assert row["median_s"] > 0 and math.isfinite(row["ratio_to_torch_foreach"])
        assert row["first_step_wall_s"] > 0
