"""One command for a CUDA machine: kernel tests on the device, step speed, peak memory and a short training run.

    python bench/gpu_check.py             # on a CUDA machine: bench/results/gpu_check_<device>.json
    python bench/gpu_check.py --dry-run   # the same plan on CPU at tiny sizes, written to --out or a temp file

Each section runs in its own process with a time budget (the budgets add up
to under 8 minutes on an H100); a section that fails or runs out of time is
recorded and the next one still runs. The JSON is written after every
section, so an interrupted run keeps what it measured. Sections:

- ``kernel_tests``: pytest on the kernel test files (bit-identity with
  ``eco.reference``) with ``TRITON_INTERPRET`` unset, so the kernels are
  compiled for and run on the GPU (``tests/conftest.py`` only turns the
  interpreter on when CUDA is absent); in parallel with pytest-xdist when it
  is installed.
- ``step_speed``: ``bench/step_speed.py`` on the Llama-3.2-1B weight shapes.
- ``peak_memory``: ``bench/peak_memory.py`` (``torch.cuda.max_memory_allocated``
  per phase) on its linear stack and tiny Mixtral.
- ``training``: ``bench/memory_loss.py`` arms (fp32 master weights, FP8 +
  master, naive, ECO) for a few hundred steps.

The script needs eco importable from this checkout: an editable install
(``pip install -e . --no-deps``), or nothing: without one it maps ``eco.kernels``
and ``eco_bench`` onto ``kernels/`` and ``bench/`` for its child processes
(a ``sitecustomize`` on ``PYTHONPATH``), so that a machine with torch, triton
and pytest and no network runs it as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_kernels_stochastic.py", "tests/test_kernels_sharded.py",
                "tests/test_grouped_steps.py", "tests/test_e4m3_targets.py")
# The dry run's kernel tests (under the interpreter): the E4M3 codec, and a quantized weight through the kernels.
DRY_RUN_KERNEL_TESTS = "test_decode_all_256_codes_matches_torch or test_quantized_weight_uses_the_kernels_exactly"
GRACE_S = 15  # after a section's budget: SIGINT (pytest writes its report), then SIGKILL after this many seconds
LOG_TAIL_CHARS = 6000
SHIM = '''"""eco.kernels and eco_bench from this checkout, without an install (written by bench/gpu_check.py)."""
import importlib.util
import sys

_DIRS = {"eco.kernels": %r, "eco_bench": %r}


class _CheckoutPackages:
    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _DIRS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder + "/__init__.py",
                                                      submodule_search_locations=[folder])


sys.meta_path.insert(0, _CheckoutPackages)
'''


@dataclasses.dataclass
class Section:
    name: str
    budget_s: float
    command: list[str]
    what: str
    collect: object = None  # fn(workdir: Path) -> dict: the section's results from its output files
    judge: object = None  # fn(results: dict) -> list[str]: problems that make a section that exited 0 fail


def plan(dry_run: bool, workdir: Path) -> list[Section]:
    """The sections, in order. ``dry_run``: CPU and tiny sizes, the same scripts and options otherwise."""
    py = sys.executable
    junit = workdir / "kernel_tests.xml"
    pytest_cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o",
                  "junit_family=xunit1", *KERNEL_TESTS]
    if dry_run:
        pytest_cmd += ["-k", DRY_RUN_KERNEL_TESTS]
    else:  # compiling for sm_80/90/100 without running is CI's check (tests/test_aot_compile.py), not the device's
        pytest_cmd += ["-k", "not compiles_for_the_target"]
        if importlib.util.find_spec("xdist") is not None:
            pytest_cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    device = ["--device", "cpu"] if dry_run else ["--device", "cuda"]

    speed = [py, "bench/step_speed.py", *device, "--out", str(workdir / "step_speed.json")]
    speed += (["--config", "tiny", "--formats", "fp8-row", "--states", "bf16", "--paths", "reference",
               "--runs", "1", "--warmup", "1"] if dry_run else
              ["--config", "1b", "--formats", "fp8-row,int4-group32", "--states", "bf16", "--runs", "5",
               "--warmup", "2"])

    memory = [py, "bench/peak_memory.py", *device, "--out", str(workdir / "peak_memory")]
    memory += (["--size", "tiny", "--models", "linear", "--arms", "eco-int4-g128", "--timeout", "120"] if dry_run else
               ["--models", "linear,mixtral", "--arms", "bf16-adamw,eco-fp8-row,eco-int4-g128", "--timeout", "60"])

    training = [py, "bench/memory_loss.py", *device, "--out", str(workdir), "--name", "training", "--seeds", "1",
                "--no-progress"]
    training += (["--arms", "master,eco-sr", "--steps", "3", "--warmup", "1", "--d-model", "32", "--n-layers", "1",
                  "--n-heads", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
                  "--eval-batches", "1", "--jobs", "2"] if dry_run else
                 ["--arms", "master,master-sr,naive-rtn,eco-rtn,eco-sr", "--steps", "200", "--warmup", "20",
                  "--jobs", "5"])
    return [
        Section("kernel_tests", 60 if dry_run else 150, pytest_cmd,
                "the kernels against eco.reference, bit for bit" + (" (two tests, interpreter)" if dry_run else ""),
                collect=lambda _: junit_summary(junit), judge=judge_tests),
        Section("step_speed", 90 if dry_run else 110, speed, "optimizer.step() time per arm",
                collect=lambda d: read_json(d / "step_speed.json"),
                judge=lambda results: judge_speed(results, kernels_expected=not dry_run)),
        Section("peak_memory", 120, memory, "peak memory per phase, bytes per parameter",
                collect=lambda d: read_json(d / "peak_memory.json"), judge=judge_memory),
        Section("training", 120 if dry_run else 70, training, "ECO against master weights: final validation loss",
                collect=lambda d: training_summary(d / "training.json"), judge=judge_training),
    ]


# ---------------------------------------------------------------- reading results
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or "").strip().splitlines()
                problems.append(dict(test=f"{case.get('classname')}::{case.get('name')}", kind=kind,
                                     message=message[0][:300] if message else ""))
    return dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                time_s=float(suite.get("time", 0)), not_passed=problems[:60])


def training_summary(path: Path) -> dict:
    data = read_json(path)
    if not data:
        return {}
    runs = [{k: r[k] for k in ("arm", "label", "seed", "final_val_loss", "diverged", "skipped_steps",
                               "static_bytes_per_param", "wall_s", "eval_steps", "val_loss", "peak_cuda_mib")
             if k in r} for r in data["runs"]]
    return dict(command=data["command"], config=data["config"], corpus=data["corpus"], device=data["device"],
                total_wall_s=data["total_wall_s"], skipped=data["skipped"], summary=data["summary"], runs=runs)


def judge_tests(results: dict) -> list[str]:
    if not results:
        return ["no junit report"]
    bad = [p for p in results["not_passed"] if p["kind"] != "skipped"]
    problems = [f"{p['test']}: {p['kind']}" for p in bad]
    if results["tests"] == 0:
        problems.append("no test ran")
    return problems


def judge_speed(results: dict, kernels_expected: bool) -> list[str]:
    """Every eco arm that should run here ran (a missing bitsandbytes is a peer's absence, not a failure)."""
    if not results:
        return ["no step_speed JSON"]
    expected_skips = {"bnb-adamw8bit", "torch-fused"} | (set() if kernels_expected else {"eco kernel path"})
    return [f"{arm}: {why}" for arm, why in results.get("skipped", {}).items()
            if arm not in expected_skips and "--paths" not in why]


def judge_memory(results: dict) -> list[str]:
    if not results:
        return ["no peak_memory JSON"]
    return [f"{r['model']} {r['arm']}: {r['status']}: {r.get('reason', '')}"[:300] for r in results["rows"]
            if r["status"] != "ok"]


def judge_training(results: dict) -> list[str]:
    if not results:
        return ["no training JSON"]
    return [f"{r['arm']}: diverged" for r in results["summary"] if r["diverged"]]


# ---------------------------------------------------------------- running
def run_section(section: Section, env: dict, workdir: Path, budget_s: float) -> dict:
    """Run one section under its budget; never raises."""
    log_path = workdir / f"{section.name}.log"
    record = dict(what=section.what, command=shlex.join(_relative(section.command)), budget_s=round(budget_s, 1))
    start = time.perf_counter()
    timed_out = False
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(section.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                returncode = proc.wait(timeout=budget_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = _stop(proc)
    except OSError as exc:
        return dict(record, status="error", wall_s=0.0, reason=f"{type(exc).__name__}: {exc}")
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["returncode"] = returncode
    try:
        record["results"] = section.collect(workdir) if section.collect else {}
        problems = section.judge(record["results"]) if section.judge else []
    except Exception as exc:  # noqa: BLE001 - a half-written output is recorded, the next section still runs
        record["results"], problems = {}, [f"reading the results failed: {type(exc).__name__}: {exc}"]
    if timed_out:
        status = "timed out"
    elif returncode != 0 or problems:
        status = "failed"
    else:
        status = "passed"
    record.update(status=status, problems=problems[:60])
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    record["log_tail"] = text[-LOG_TAIL_CHARS:]
    return record


def _stop(proc: subprocess.Popen) -> int:
    """SIGINT the section's process group (pytest then writes its report), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _relative(command: list[str]) -> list[str]:
    return ["python" if c == sys.executable else c for c in command]


def child_env(dry_run: bool, workdir: Path) -> tuple[dict, dict]:
    """The environment of every section, and what was done to it (recorded in the JSON)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    notes = {}
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU plan even where a GPU is present
    elif env.pop("TRITON_INTERPRET", None) is not None:
        notes["TRITON_INTERPRET"] = "was set; unset for the sections (kernels run on the GPU)"
    return env, notes


def add_import_shim(env: dict, notes: dict, workdir: Path) -> None:
    """Without an install that imports eco from this checkout, map eco.kernels and eco_bench here (``SHIM``)."""
    probe = ("import pathlib, eco, eco.kernels, eco_bench; "
             "print(all(pathlib.Path(m.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()) "
             "for m in (eco, eco.kernels, eco_bench)))")
    if _python_says(probe, env) != "True":
        shim = workdir / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(SHIM % (str(ROOT / "kernels"), str(ROOT / "bench")))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), str(ROOT), env.get("PYTHONPATH")]))
        if _python_says(probe, env) != "True":
            notes["imports"] = "eco, eco.kernels and eco_bench do not import from this checkout; sections will fail"
        else:
            notes["imports"] = "no editable install: eco.kernels and eco_bench mapped onto kernels/ and bench/"


def _python_says(code: str, env: dict) -> str:
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""


def machine(dry_run: bool) -> dict:
    """What produced the file: the device as torch names it, versions, the commit."""
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or
                platform.machine(), cpu_count=os.cpu_count())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if dry_run or not torch.cuda.is_available():
        info.update(device="CPU (dry run: no GPU measured)", device_type="cpu")
    else:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_type="cuda", cuda=torch.version.cuda,
                    capability=f"sm_{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, visible_devices=torch.cuda.device_count())
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem", "--format=csv"])
        if smi:
            info["nvidia_smi"] = smi
    info["commit"] = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    info["uncommitted_changes"] = bool(status) if status is not None else None
    return info


def _run(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same plan on CPU at tiny sizes (for CI); writes to --out or a temp file")
    parser.add_argument("--out", help="the JSON to write (default: bench/results/gpu_check_<device>.json; with "
                                      "--dry-run a file in the temp folder)")
    parser.add_argument("--sections", help="comma-separated subset of the sections, in plan order")
    parser.add_argument("--total-budget", type=float, default=450.0,
                        help="seconds for all sections together (a stopped section may take GRACE_S more to end)")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: this check measures a GPU. Use --dry-run to exercise it on CPU")
    info = machine(args.dry_run)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.gettempdir()) / "gpu_check_dry_run.json"
    else:
        out = RESULTS / f"gpu_check_{device_slug(info['device'])}.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        sections = plan(args.dry_run, workdir)
        if args.sections:
            wanted = [s.strip() for s in args.sections.split(",")]
            unknown = set(wanted) - {s.name for s in sections}
            if unknown:
                parser.error(f"unknown section(s) {sorted(unknown)}; choose from {[s.name for s in sections]}")
            sections = [s for s in sections if s.name in wanted]
        env, env_notes = child_env(args.dry_run, workdir)
        add_import_shim(env, env_notes, workdir)
        report = dict(
            check="bench/gpu_check.py", dry_run=args.dry_run, machine=info, environment=env_notes,
            kernels_run=("under Triton's CPU interpreter (dry run)" if args.dry_run else
                         "compiled by Triton for this GPU (TRITON_INTERPRET unset)"),
            command=shlex.join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
            started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            sections={}, passed=False,
        )
        for section in sections:
            left = args.total_budget - (time.perf_counter() - started)
            budget = min(section.budget_s, left - GRACE_S)
            if budget < 5:
                report["sections"][section.name] = dict(what=section.what, status="not run",
                                                        reason=f"total budget of {args.total_budget:.0f} s spent")
            else:
                print(f"[gpu_check] {section.name}: {section.what} (budget {budget:.0f} s)", flush=True)
                report["sections"][section.name] = run_section(section, env, workdir, budget)
                record = report["sections"][section.name]
                print(f"[gpu_check] {section.name}: {record['status']} in {record['wall_s']} s"
                      + "".join(f"\n    {p}" for p in record.get("problems", [])[:10]), flush=True)
            report["total_wall_s"] = round(time.perf_counter() - started, 1)
            report["passed"] = all(s["status"] == "passed" for s in report["sections"].values())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"[gpu_check] {'passed' if report['passed'] else 'FAILED'} in {report['total_wall_s']} s; wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
