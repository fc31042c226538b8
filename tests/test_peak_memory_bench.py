"""bench/peak_memory.py: the saved-tensor census split, the peak breakdown, and tiny runs end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import eco

BENCH = Path(__file__).resolve().parents[1] / "bench" / "peak_memory.py"


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("peak_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(32, 32, bias=False)
        self.dense = nn.Linear(32, 32, bias=False)
        self.experts = nn.Parameter(torch.randn(4, 8, 32))


def test_census_splits_weight_copies_shared_weights_and_activations(pm):
    model = Experts()
    eco.quantize_(model, eco.INT4(group_size=32), filter_fn=lambda name, p: not name.startswith("plain"))
    assert isinstance(model.dense.weight, eco.QuantizedTensor) and isinstance(model.experts, eco.QuantizedTensor)
    census = pm.SavedTensorCensus(model)

    census.add(model.plain.weight.t())  # a view of a parameter: no bytes of its own
    census.add(model.dense.weight)  # the quantized weight itself: its codes and scales exist anyway
    dense_copy = model.dense.weight.dequantize()
    census.add(dense_copy.t())
    census.add(dense_copy)  # the same storage again: counted, its bytes once
    expert_copy = model.experts.dequantize()[2].clone()  # one expert's slice, dequantized
    census.add(expert_copy)
    activation = torch.randn(5, 32)
    census.add(activation)
    census.add(activation[1:])  # a view of a counted activation

    assert census.count == {"weight copies": 3, "weights (shared)": 2, "activations": 2}
    assert census.kind(model.plain.weight.t()) == "weights (shared)"
    assert census.kind(model.dense.weight) == "weights (shared)"
    assert census.kind(dense_copy) == "weight copies"
    assert census.kind(expert_copy) == "weight copies"
    assert census.kind(activation) == "activations"
    assert census.bytes["weight copies"] == 32 * 32 * 4 + 8 * 32 * 4
    assert census.bytes["activations"] == 5 * 32 * 4
    assert census.bytes["weights (shared)"] == 0


def test_census_of_a_plain_linear_backward_saves_no_weight_copy(pm):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    census = pm.SavedTensorCensus(model)
    x = torch.randn(6, 32)
    with census.hooks():
        loss = model(x).square().mean()
    loss.backward()
    assert census.bytes["weight copies"] == 0
    assert census.count["weights (shared)"] >= 1  # the second Linear saves its weight (a view) for the input's grad
    assert census.bytes["activations"] >= 6 * 32 * 4  # the first Linear's output, the second's input


def test_breakdown_splits_the_forward_backward_and_step_peaks(pm):
    static = dict(total_bytes=100, weights=40, optimizer_states=60)
    census = dict(bytes={"weight copies": 30, "weights (shared)": 0, "activations": 5})
    run = dict(static=static, census=census, gradient_bytes=20,
               transient=dict(forward=35, backward=50, step=80, whole=80))
    parts = pm.breakdown(run)
    assert parts["step"] == {"weights": 40, "optimizer states": 60, "gradients": 20, "saved weight copies": 0,
                             "activations": 0, "fwd/bwd temporaries": 0, "step temporaries": 60}
    # backward is the higher of forward and backward: gradients, the census, then the rest
    assert parts["forward/backward"] == {"weights": 40, "optimizer states": 60, "gradients": 20,
                                         "saved weight copies": 30, "activations": 0, "fwd/bwd temporaries": 0,
                                         "step temporaries": 0}
    assert sum(parts["step"].values()) == pm.peaks(run)["max of phases"] == 180

    run["transient"] = dict(forward=45, backward=30, step=25, whole=45)
    parts = pm.breakdown(run)["forward/backward"]
    assert (parts["saved weight copies"], parts["activations"], parts["fwd/bwd temporaries"]) == (30, 5, 10)
    assert parts["gradients"] == 0 and sum(parts.values()) == 145


def test_arms_are_unique_and_features_are_detected(pm):
    arms = pm.all_arms()
    assert len({a.name for a in arms}) == len(arms)
    names = {a.name for a in arms}
    assert {"bf16-adamw", "fp32-adamw", "bnb-adamw8bit", "torchao-adamw4bit", "eco-fp8-row/compiled",
            "eco-int4-g128/release", "eco-int4-g128/compiled/model-compiled",
            "eco-int4-g128-m8-vfactored/release"} <= names
    cpu = torch.device("cpu")
    release = next(a for a in arms if a.name == "eco-int4-g128/release")
    reason = pm.unavailable_reason(release, cpu)
    import inspect

    has_release = set(pm.RELEASE_OPTION) <= set(inspect.signature(eco.AdamW).parameters)
    assert (reason is None) == has_release
    assert pm.unavailable_reason(next(a for a in arms if a.name == "eco-fp8-row"), cpu) is None


@pytest.fixture(scope="module")
def tiny_run(pm, tmp_path_factory):
    out = tmp_path_factory.mktemp("peak") / "pm"
    arms = "bf16-adamw,eco-int4-g128,eco-int4-g128/release"
    result = pm.main(["--size", "tiny", "--models", "linear", "--arms", arms, "--out", str(out), "--label", "test"])
    return out, result


def test_tiny_run_writes_json_markdown_and_png(tiny_run):
    out, result = tiny_run
    saved = json.loads(out.with_name("pm.json").read_text())
    assert saved["label"] == "test" and saved["models"] == ["linear"]
    rows = {r["arm"]: r for r in saved["rows"]}
    assert set(rows) == {"bf16-adamw", "eco-int4-g128", "eco-int4-g128/release"}
    assert rows["bf16-adamw"]["status"] == "ok" and rows["eco-int4-g128"]["status"] == "ok"
    assert rows["eco-int4-g128/release"]["status"] in ("ok", "unavailable")
    md = out.with_name("pm.md").read_text()
    assert "| bf16-adamw |" in md and "| eco-int4-g128 |" in md
    png = out.with_name("pm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_render_writes_the_same_markdown_again(pm, tiny_run):
    out, _ = tiny_run
    md = out.with_name("pm.md").read_text()
    out.with_name("pm.md").unlink()
    pm.main(["--render", str(out.with_name("pm.json"))])
    assert out.with_name("pm.md").read_text() == md


def test_tiny_run_phases_and_census_are_sane(tiny_run):
    _, result = tiny_run
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        b, static = row["bytes_per_param"], row["static_bytes_per_param"]
        assert list(row["per_run"][0]["transient"]) == ["forward", "backward", "step", "whole"]
        assert all(b[p] >= static for p in ("forward", "backward", "step", "whole"))
        # the separately measured whole step peaks where its highest phase did
        assert abs(b["whole"] - b["max of phases"]) <= 0.15 * b["max of phases"]
        # gradients exist at the end of backward and during the step
        if not row["spec"]["release"]:
            assert row["gradient_bytes_per_param"] > 0
            assert b["step"] >= static + 0.9 * row["gradient_bytes_per_param"]
        census = row["census_bytes_per_param"]
        assert census["activations"] > 0 and census["weights (shared)"] == 0
        bars = row["breakdown_bytes_per_param"]
        assert sum(bars["step"].values()) == pytest.approx(b["step"], rel=1e-6)
        assert sum(bars["forward/backward"].values()) == pytest.approx(max(b["forward"], b["backward"]), rel=1e-6)
    rows = {r["arm"]: r for r in result["rows"]}
    bf16 = rows["bf16-adamw"]
    assert bf16["census_bytes_per_param"]["weight copies"] == 0  # plain weights: autograd saves views
    assert bf16["static_bytes_per_param"] == 6.0  # bf16 weights, m and v
    assert rows["eco-int4-g128"]["static_bytes_per_param"] < 5.0


def test_tiny_step_temporaries(pm, tmp_path):
    out = tmp_path / "steps"
    result = pm.main(["--step-temporaries", "--step-shape", "2x64x256", "--step-formats", "int4-g128",
                      "--step-backends", "auto", "--out", str(out)])
    rows = result["rows"]
    assert [(r["shape"], r["status"]) for r in rows] == [([2, 64, 256], "ok"), ([16, 64, 256], "ok")]
    assert all(r["temporaries_bytes"] > 0 and r["bytes_per_element"] > 0 for r in rows)
    assert json.loads(out.with_name("steps.json").read_text())["rows"][1]["numel"] == 16 * 64 * 256
    assert "| int4-g128 | auto | 16x64x256 |" in out.with_name("steps.md").read_text()


def test_every_eco_arm_builds_its_optimizer(pm):
    import eco

    for arm in pm.all_arms():
        if arm.optimizer != "eco":
            continue
        model = torch.nn.Linear(64, 64, bias=False)
        eco.quantize_(model, eco.FP8())
        opt = eco.AdamW(model.parameters(), lr=1e-3, **arm.eco_options())
        names = {opt.state_formats[k].name for k in ("exp_avg", "exp_avg_sq")}
        assert names == ({"int8", "factored"} if arm.low_bit_states else {"bf16"}), arm.name
