"""bench/gpu_check.py: its CPU dry run end to end, and the time boxes, failures and imports it must survive on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eco_bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def python_section(name: str, code: str, budget: float) -> gpu_check.Section:
    return gpu_check.Section(name, budget, [sys.executable, "-c", code], f"test section {name}",
                             collect=lambda _: {"ran": True}, judge=lambda results: [])


def test_a_section_over_its_budget_is_stopped_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 2)
    section = python_section("sleeper", "import time; print('started', flush=True); time.sleep(120)", budget=3)
    record = gpu_check.run_section(section, dict(gpu_check.os.environ), tmp_path, budget_s=3)
    assert record["status"] == "timed out"
    assert 3 <= record["wall_s"] < 30
    assert "started" in record["log_tail"]


def test_a_failing_section_is_recorded_with_its_output(tmp_path):
    section = python_section("crash", "import sys; print('boom'); sys.exit(3)", budget=60)
    record = gpu_check.run_section(section, dict(gpu_check.os.environ), tmp_path, budget_s=60)
    assert record["status"] == "failed" and record["returncode"] == 3
    assert "boom" in record["log_tail"]
    section.judge = lambda results: ["a problem the section's output shows"]
    section.command = [sys.executable, "-c", "pass"]
    record = gpu_check.run_section(section, dict(gpu_check.os.environ), tmp_path, budget_s=60)
    assert record["status"] == "failed" and record["problems"] == ["a problem the section's output shows"]


def test_the_import_shim_maps_eco_bench_onto_the_checkout(tmp_path):
    """Without an install (python -S: no .pth file runs), eco_bench (like eco.kernels) imports only through the shim."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(gpu_check.SHIM % (str(ROOT / "kernels"), str(ROOT / "bench")))
    code = "import sys; sys.path[:0] = [{shim!r}]; {load}import eco_bench; print(eco_bench.__file__)"
    without = subprocess.run([sys.executable, "-S", "-c", code.format(shim=str(shim), load="")],
                             cwd=tmp_path, capture_output=True, text=True)
    assert without.returncode != 0 and "No module named 'eco_bench'" in without.stderr
    with_shim = subprocess.run([sys.executable, "-S", "-c", code.format(shim=str(shim), load="import sitecustomize; ")],
                               cwd=tmp_path, capture_output=True, text=True)
    assert with_shim.returncode == 0, with_shim.stderr
    assert with_shim.stdout.strip() == str(ROOT / "bench" / "__init__.py")


def test_the_gpu_plan_runs_the_kernel_tests_on_the_device_within_eight_minutes(tmp_path):
    sections = gpu_check.plan(dry_run=False, workdir=tmp_path)
    assert [s.name for s in sections] == ["kernel_tests", "step_speed", "peak_memory", "training"]
    assert sum(s.budget_s for s in sections) + 2 * gpu_check.GRACE_S <= 8 * 60
    tests = sections[0].command
    assert all(f in tests for f in gpu_check.KERNEL_TESTS)
    assert tests[tests.index("-k") + 1] == "not compiles_for_the_target"  # the AOT checks need no GPU
    assert all(Path(ROOT / f).is_file() for f in gpu_check.KERNEL_TESTS)
    assert all("--device" in s.command and "cuda" in s.command for s in sections[1:])
    env, _ = gpu_check.child_env(dry_run=False, workdir=tmp_path)
    assert "TRITON_INTERPRET" not in env  # kernels compiled for the GPU, not interpreted


def test_without_a_gpu_only_the_dry_run_runs(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check would run")
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "--dry-run" in capsys.readouterr().err


def test_device_names_become_file_names():
    assert gpu_check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert gpu_check.device_slug("NVIDIA A100-SXM4-40GB") == "nvidia_a100_sxm4_40gb"


@pytest.mark.slow
def test_dry_run_writes_one_json_with_every_section(tmp_path):
    """The whole plan on CPU at tiny sizes (about a minute and a half on two shared cores)."""
    out = tmp_path / "check.json"
    results_before = set((ROOT / "bench" / "results").iterdir())
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout, {k: s.get("log_tail") for k, s in report["sections"].items()})
    assert report["dry_run"] and report["passed"]
    assert report["machine"]["device_type"] == "cpu" and "dry run" in report["machine"]["device"]
    sections = report["sections"]
    assert list(sections) == ["kernel_tests", "step_speed", "peak_memory", "training"]
    for record in sections.values():
        assert record["status"] == "passed" and 0 < record["wall_s"] <= record["budget_s"]
    assert sections["kernel_tests"]["results"]["passed"] >= 2
    assert "eco/fp8-row/bf16/reference" in [r["arm"] for r in sections["step_speed"]["results"]["rows"]]
    assert [r["status"] for r in sections["peak_memory"]["results"]["rows"]] == ["ok"]
    assert {r["arm"] for r in sections["training"]["results"]["summary"]} == {"master", "eco-sr"}
    assert set((ROOT / "bench" / "results").iterdir()) == results_before  # a dry run measures no device


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_gpu_plan_names_configs_formats_and_arms_that_exist(tmp_path):
    """A renamed arm or config must fail here, not on the GPU (where the check runs once)."""
    from eco_bench import memory_loss, peak_memory, step_speed

    speed, memory, training = (s.command for s in gpu_check.plan(dry_run=False, workdir=tmp_path)[1:])
    assert option(speed, "--config") in step_speed.CONFIGS
    assert set(option(speed, "--formats").split(",")) <= set(step_speed.FORMAT_TAGS)
    assert set(option(speed, "--states").split(",")) <= set(step_speed.STATES)
    assert set(option(memory, "--models").split(",")) <= set(peak_memory.MODELS)
    assert set(option(memory, "--arms").split(",")) <= {a.name for a in peak_memory.all_arms()}
    cfg, jobs = memory_loss.parse_args(training[2:])
    assert set(cfg.arms) <= set(memory_loss.ALL_ARMS) and cfg.device == "cuda" and jobs == 5
