"""Peak memory of a training step (forward, backward, optimizer step), per arm, in bytes per model parameter.

Every arm (model weights + optimizer) runs in its own fresh process: build the
model and optimizer, one warm-up step (optimizer state allocated, compiled code
built), a saved-tensor census pass (forward + backward), then two measured steps:
one with the peak reset before each phase (forward, backward, ``optimizer.step()``),
one with a single reset for the whole step.

How a peak is measured

- CPU: Linux ``VmHWM`` (peak resident set), reset by writing ``5`` to
  ``/proc/self/clear_refs`` before a phase. The child process runs glibc with
  ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, so a freed tensor
  leaves the resident set at once. The resident set just before the measured
  step (imports, model, optimizer state, compiled code: everything after
  warm-up) is subtracted and the static bytes of weights and optimizer state
  (``eco.memory_report``) are added back: ``peak = static + (VmHWM - baseline)``.
  Only touched pages count.
- CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` per
  phase, with ``memory_allocated`` before the step as the baseline; same formula.

The saved-tensor census (``torch.autograd.graph.saved_tensors_hooks`` over one
forward + backward) counts the bytes autograd keeps for backward, each storage
once, split into

- ``weight copies``: plain tensors that share no storage with a parameter and
  whose numel is that of a parameter of 2+ dimensions or of one expert (dim-0
  slice) of a 3-D one, e.g. a dequantized weight kept for backward (the model
  configs are chosen so that no activation has such a numel);
- ``weights (shared)``: parameters, views of them and quantized weights: no
  bytes beyond the weights themselves;
- ``activations``: everything else.

Arms are defined even where the feature they need has not landed (gradient
release, eco's low-bit optimizer states, torchao's low-bit AdamW): such an arm is
reported as ``unavailable: <reason>``, detected by feature (an ``eco.AdamW``
keyword, an importable package), and runs once the feature exists.

Writes ``<out>.json``, ``<out>.md`` (the table) and ``<out>.png`` (stacked bars);
``--out`` defaults to ``bench/results/peak_memory``.

    python bench/peak_memory.py                                     # every arm, both models
    python bench/peak_memory.py --models mixtral --arms 'eco-int4*,bf16-adamw' --repeats 3
    python bench/peak_memory.py --list                              # the arms and whether they run here
    python bench/peak_memory.py --step-temporaries                  # the optimizer step's temporary memory alone

``--step-temporaries`` measures ``optimizer.step()``'s temporary memory (peak
above the resident set before the step, states already allocated) on one
``[8, 1024, 2048]`` expert-shaped quantized weight and on one 8x larger, for
eco's default path and ``backend="compiled"``; ``--out`` defaults to
``bench/results/peak_memory_step_temporaries``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import fnmatch
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import eco
from eco.memory import inner_tensors, storage_key

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("forward", "backward", "step")
CENSUS_KINDS = ("weight copies", "weights (shared)", "activations")
BAR_PARTS = ("weights", "optimizer states", "gradients", "saved weight copies", "activations",
             "fwd/bwd temporaries", "step temporaries")
BARS = ("forward/backward", "step")  # the two peaks drawn for each arm
CHILD_ENV = {  # glibc returns freed tensors to the OS at once: VmHWM then tracks live tensors
    "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "TORCHINDUCTOR_COMPILE_THREADS": "1",
}
HYPERPARAMETERS = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)  # every optimizer, every arm
EXPERT_SHAPE = (8, 1024, 2048)  # --step-temporaries: one fused expert tensor, and one 8x larger


# ---------------------------------------------------------------- models
SIZES = {
    # Token counts are chosen so that no activation has the numel of a weight or of one expert
    # (the census tells a weight-sized copy by its numel).
    "default": {
        "linear": dict(width=1024, layers=8, tokens=96),
        "mixtral": dict(vocab=256, hidden=512, intermediate=1024, layers=2, experts=8, heads=4, kv_heads=2,
                        batch=2, seq=60),
    },
    "tiny": {  # tests: seconds per arm
        "linear": dict(width=128, layers=3, tokens=24),
        "mixtral": dict(vocab=64, hidden=128, intermediate=128, layers=1, experts=4, heads=2, kv_heads=1,
                        batch=2, seq=12),
    },
}


def model_label(name: str, cfg: dict) -> str:
    if name == "linear":
        return f"{cfg['layers']} x nn.Linear({cfg['width']}, {cfg['width']}), {cfg['tokens']} tokens"
    return (f"HF Mixtral: hidden {cfg['hidden']}, {cfg['experts']} experts, {cfg['layers']} layers, fused experts "
            f"on grouped_mm; batch {cfg['batch']} x {cfg['seq']} tokens")


def linear_stack(cfg: dict, dtype: torch.dtype, device: torch.device):
    """``layers`` x ``nn.Linear(width, width)`` in sequence; loss = mean square of the output."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(cfg["width"], cfg["width"]) for _ in range(cfg["layers"])])
    x = torch.randn(cfg["tokens"], cfg["width"]).to(device=device, dtype=dtype)
    return model.to(device=device, dtype=dtype), lambda m: m(x).float().square().mean()


def mixtral(cfg: dict, dtype: torch.dtype, device: torch.device):
    """A tiny ``transformers`` Mixtral built from a config (nothing downloaded), fused experts on ``grouped_mm``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        num_local_experts=cfg["experts"], num_experts_per_tok=2, max_position_embeddings=1024,
        tie_word_embeddings=False, router_aux_loss_coef=0.0,
    )
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(device=device, dtype=dtype)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    return model, lambda m: m(input_ids=batch, labels=batch).loss


MODELS = {"linear": linear_stack, "mixtral": mixtral}


# ---------------------------------------------------------------- arms
ECO_FORMATS = {"fp8-row": lambda: eco.FP8(), "int4-g128": lambda: eco.INT4(group_size=128)}
# Features that other work adds to eco.AdamW, detected by keyword. A landed feature with another
# spelling needs only these two lines changed.
RELEASE_OPTION = {"gradient_release": True}  # step each parameter during backward, free its gradient
LOW_BIT_STATE_OPTIONS = {"momentum": "int8", "second_moment": "factored"}  # 8-bit m and a factored v


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    weights: str  # "bf16" / "fp32" (plain model weights) or a key of ECO_FORMATS (quantized from bf16)
    optimizer: str  # "torch-adamw", "bnb-adamw8bit", "torchao-adamw8bit", "torchao-adamw4bit", "eco"
    backend: str = "auto"  # eco.AdamW's backend
    compile_model: bool = False  # torch.compile(model)
    release: bool = False  # gradient release
    low_bit_states: bool = False  # eco's 8-bit momentum + factored second moment instead of bf16 states

    @property
    def quantized(self) -> bool:
        return self.weights in ECO_FORMATS

    def eco_options(self) -> dict:
        states = LOW_BIT_STATE_OPTIONS if self.low_bit_states else {"state_dtype": torch.bfloat16}
        options = dict(states, seed=0, backend=self.backend)
        if self.release:
            options.update(RELEASE_OPTION)
        return options


def all_arms() -> list[Arm]:
    arms = [
        Arm("bf16-adamw", "bf16 weights + torch AdamW (bf16 states)", "bf16", "torch-adamw"),
        Arm("bf16-adamw/model-compiled", "bf16 weights + torch AdamW, torch.compile(model)", "bf16", "torch-adamw",
            compile_model=True),
        Arm("fp32-adamw", "fp32 weights + torch AdamW", "fp32", "torch-adamw"),
        Arm("bnb-adamw8bit", "bitsandbytes AdamW8bit, bf16 weights", "bf16", "bnb-adamw8bit"),
        Arm("torchao-adamw8bit", "torchao AdamW8bit, bf16 weights", "bf16", "torchao-adamw8bit"),
        Arm("torchao-adamw4bit", "torchao AdamW4bit, bf16 weights", "bf16", "torchao-adamw4bit"),
    ]
    fmt_labels = {"fp8-row": "ECO FP8 row", "int4-g128": "ECO INT4 g128"}
    for fmt, fmt_label in fmt_labels.items():
        variants = [  # (name suffix, label suffix, backend, compile_model, low_bit_states)
            ("", "bf16 states, default step (CPU: eager reference)", "auto", False, False),
            ("/compiled", "bf16 states, compiled step", "compiled", False, False),
            ("/compiled/model-compiled", "bf16 states, compiled step, torch.compile(model)", "compiled", True, False),
            ("-m8-vfactored", "8-bit m + factored v, default step (CPU: eager reference)", "auto", False, True),
            ("-m8-vfactored/compiled", "8-bit m + factored v, compiled step", "compiled", False, True),
        ]
        for suffix, label, backend, compile_model, low_bit in variants:
            for release in (False, True):
                name = f"eco-{fmt}{suffix}" + ("/release" if release else "")
                arms.append(Arm(name, f"{fmt_label}, {label}" + (", gradient release" if release else ""), fmt, "eco",
                                backend=backend, compile_model=compile_model, release=release,
                                low_bit_states=low_bit))
    return arms


def unavailable_reason(arm: Arm, device: torch.device) -> str | None:
    """Why ``arm`` cannot run here, or None. Detects features; building the arm is the child's job."""
    if arm.optimizer.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'eco-optim[peers]')"
    if arm.optimizer == "bnb-adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if arm.optimizer != "eco":
        return None
    keywords = set(inspect.signature(eco.AdamW).parameters)
    missing = []
    if arm.release and not set(RELEASE_OPTION) <= keywords:
        missing.append(f"eco.AdamW has no {'/'.join(RELEASE_OPTION)} option (gradient release)")
    if arm.low_bit_states and not set(LOW_BIT_STATE_OPTIONS) <= keywords:
        missing.append(f"eco.AdamW has no {'/'.join(LOW_BIT_STATE_OPTIONS)} options (low-bit states)")
    if arm.backend == "compiled" and device.type != "cpu":
        missing.append("backend='compiled' is eco's CPU path")
    if missing:
        return "; ".join(missing)
    return None


def build(arm: Arm, model_name: str, cfg: dict, device: torch.device):
    """(model, loss_fn, optimizer) for ``arm``; the model is torch.compile'd inside ``loss_fn`` if the arm says so."""
    dtype = torch.float32 if arm.weights == "fp32" else torch.bfloat16
    model, loss_fn = MODELS[model_name](cfg, dtype, device)
    if arm.quantized:
        eco.quantize_(model, ECO_FORMATS[arm.weights]())
    params = list(model.parameters())
    if arm.optimizer == "eco":
        optimizer = eco.AdamW(params, **HYPERPARAMETERS, **arm.eco_options())
    elif arm.optimizer == "torch-adamw":
        optimizer = torch.optim.AdamW(params, **HYPERPARAMETERS)
    elif arm.optimizer == "bnb-adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, **HYPERPARAMETERS)
    elif arm.optimizer.startswith("torchao-"):
        import torchao.optim

        cls = {"torchao-adamw8bit": torchao.optim.AdamW8bit, "torchao-adamw4bit": torchao.optim.AdamW4bit}
        optimizer = cls[arm.optimizer](params, **HYPERPARAMETERS)
    else:
        raise ValueError(f"unknown optimizer {arm.optimizer!r}")
    run_model = torch.compile(model) if arm.compile_model else model
    return model, (lambda: loss_fn(run_model)), optimizer


# ---------------------------------------------------------------- measuring
class Meter:
    """Current and peak memory of this process: resident set on CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            missing = [k for k in CHILD_ENV if k.startswith("MALLOC") and os.environ.get(k) != CHILD_ENV[k]]
            if missing:
                raise RuntimeError(f"set {missing} in the environment (the parent process does it for its children)")
            self._libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def settle(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            self._libc.malloc_trim(0)

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")


class SavedTensorCensus:
    """Bytes autograd saves for backward, by kind (``CENSUS_KINDS``); each storage counted once.

    Use ``with census.hooks(): loss = ...; loss.backward()``.
    """

    def __init__(self, model: nn.Module):
        self.shared: set = set()  # storages of the parameters (codes and scales of quantized ones)
        self.weight_numels: set[int] = set()  # numel of each 2+-D parameter and of one expert of a 3-D one
        for p in model.parameters():
            self.shared.update(storage_key(t) for t in inner_tensors(p))
            if p.dim() >= 2:
                self.weight_numels.add(p.numel())
            if p.dim() == 3:
                self.weight_numels.add(math.prod(p.shape[1:]))
        self.bytes = dict.fromkeys(CENSUS_KINDS, 0)
        self.count = dict.fromkeys(CENSUS_KINDS, 0)
        self._seen: set = set()

    def kind(self, t: torch.Tensor) -> str:
        inners = inner_tensors(t)
        if any(storage_key(i) in self.shared for i in inners):
            return "weights (shared)"
        if inners == [t] and t.numel() in self.weight_numels:
            return "weight copies"
        return "activations"

    def add(self, t: torch.Tensor) -> None:
        kind = self.kind(t)
        self.count[kind] += 1
        for inner in inner_tensors(t):
            key = storage_key(inner)
            if key not in self._seen:
                self._seen.add(key)
                if kind != "weights (shared)":
                    self.bytes[kind] += inner.untyped_storage().nbytes()

    def _pack(self, t):
        self.add(t)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def as_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "count": dict(self.count)}


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``eco.memory_report`` of the model and optimizer, split into weights and optimizer states."""
    report = eco.memory_report(model, optimizer)
    by_kind = report.bytes_by_kind
    weights = sum(by_kind.get(k, 0) for k in ("weight codes", "weight scales", "unquantized params"))
    return dict(report.as_dict(), weights=weights, optimizer_states=report.total_bytes - weights)


def gradient_bytes(model: nn.Module) -> int:
    grads = {storage_key(p.grad): p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None}
    return sum(grads.values())


def measure_arm(arm: Arm, model_name: str, cfg: dict, device: torch.device, warmup: int) -> dict:
    """One arm in this (fresh) process: warm-up, census, a phase-by-phase step and a whole step."""
    meter = Meter(device)
    meter.settle()
    after_imports = meter.current()
    model, loss_fn, optimizer = build(arm, model_name, cfg, device)

    def train_step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        train_step()
    census = SavedTensorCensus(model)
    with census.hooks():
        loss = loss_fn()
    loss.backward()
    del loss
    optimizer.zero_grad(set_to_none=True)
    static = static_bytes(model, optimizer)

    meter.settle()
    baseline = meter.current()
    phases, starts = {}, {}
    meter.reset_peak()
    loss = loss_fn()
    phases["forward"] = meter.peak() - baseline
    starts["backward"] = meter.current() - baseline
    meter.reset_peak()
    loss.backward()
    phases["backward"] = meter.peak() - baseline
    grads = gradient_bytes(model)
    starts["step"] = meter.current() - baseline
    meter.reset_peak()
    optimizer.step()
    phases["step"] = meter.peak() - baseline
    optimizer.zero_grad(set_to_none=True)
    del loss

    meter.settle()
    whole_baseline = meter.current()
    meter.reset_peak()
    train_step()
    phases["whole"] = meter.peak() - whole_baseline
    return dict(
        transient=phases, phase_start=starts, gradient_bytes=grads, static=static, census=census.as_dict(),
        baseline_bytes=baseline, baseline_drift_bytes=whole_baseline - baseline,
        resident_growth_bytes=baseline - after_imports,
    )


def measure_step_temporaries(fmt_name: str, backend: str, shape: list[int], device: torch.device) -> dict:
    """Peak memory of ``optimizer.step()`` above the resident set before it, on one quantized weight."""
    meter = Meter(device)
    torch.manual_seed(0)
    with torch.device(device):
        weight = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        param = nn.Parameter(eco.QuantizedTensor.from_float(weight, ECO_FORMATS[fmt_name]()))
        del weight
        param.grad = torch.randn(shape, dtype=torch.bfloat16) * 1e-3
    optimizer = eco.AdamW([param], **HYPERPARAMETERS, state_dtype=torch.bfloat16, seed=0, backend=backend)
    optimizer.step()  # states allocated, compiled code built
    static = eco.memory_report(nn.ParameterList([param]), optimizer)
    meter.settle()
    baseline = meter.current()
    meter.reset_peak()
    optimizer.step()
    temporaries = meter.peak() - baseline
    return dict(format=fmt_name, backend=backend, shape=list(shape), numel=param.numel(), temporaries_bytes=temporaries,
                bytes_per_element=temporaries / param.numel(), static_bytes=static.total_bytes,
                gradient_bytes=param.grad.numel() * param.grad.element_size())


def child_main(spec: dict, out: Path) -> None:
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    try:
        if spec["mode"] == "arm":
            arm = next(a for a in all_arms() if a.name == spec["arm"])
            result = measure_arm(arm, spec["model"], spec["cfg"], device, spec["warmup"])
        else:
            result = measure_step_temporaries(spec["format"], spec["backend"], spec["shape"], device)
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the parent records the failure and carries on with the other arms
        lines = traceback.format_exc().strip().splitlines()
        result = dict(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}", traceback=lines[-12:])
    out.write_text(json.dumps(result))


def run_child(spec: dict, timeout: float) -> dict:
    """Run ``spec`` in a fresh Python process with the allocator settings the measurement needs."""
    env = dict(os.environ, **CHILD_ENV, OMP_NUM_THREADS=str(spec["threads"]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out", str(out)]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(status="failed", reason=f"timed out after {timeout:.0f} s")
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return dict(status="failed", reason=f"child exited with {proc.returncode}: {' | '.join(tail)[:500]}")


# ---------------------------------------------------------------- summarizing
def breakdown(run: dict) -> dict[str, dict[str, int]]:
    """The forward/backward peak and the step peak, each split into BAR_PARTS.

    Both: static weights and optimizer states, then that peak's transient bytes in this order, each at most
    what is left: gradients (their size; at a backward or step peak), saved weight copies and activations (the
    census; forward/backward), and the rest: "fwd/bwd temporaries" (with gradient release this includes the
    steps taken during backward) or "step temporaries".
    """
    out = {}
    for bar in BARS:
        parts = dict.fromkeys(BAR_PARTS, 0)
        parts["weights"] = run["static"]["weights"]
        parts["optimizer states"] = run["static"]["optimizer_states"]
        phase = "step" if bar == "step" else max(("forward", "backward"), key=lambda p: run["transient"][p])
        rest = max(run["transient"][phase], 0)
        if phase != "forward":
            parts["gradients"] = min(run["gradient_bytes"], rest)
            rest -= parts["gradients"]
        if phase != "step":
            for part, kind in (("saved weight copies", "weight copies"), ("activations", "activations")):
                parts[part] = min(run["census"]["bytes"][kind], rest)
                rest -= parts[part]
        parts["step temporaries" if phase == "step" else "fwd/bwd temporaries"] = rest
        out[bar] = parts
    return out


def peaks(run: dict) -> dict[str, int]:
    """Peak bytes of each phase and of the whole step: static + transient."""
    static = run["static"]["total_bytes"]
    out = {p: static + run["transient"][p] for p in (*PHASES, "whole")}
    out["max of phases"] = max(out[p] for p in PHASES)
    return out


def summarize(model_name: str, arm: Arm, runs: list[dict], reason: str | None) -> dict:
    row = dict(model=model_name, arm=arm.name, label=arm.label, spec=asdict(arm))
    ok = [r for r in runs if r["status"] == "ok"]
    if reason is not None:
        return dict(row, status="unavailable", reason=reason)
    if not ok:
        return dict(row, status="failed", reason=runs[0]["reason"] if runs else "not run",
                    traceback=runs[0].get("traceback") if runs else None)
    n = ok[0]["static"]["num_params"]
    per_run = [{k: v / n for k, v in peaks(r).items()} for r in ok]
    keys = list(per_run[0])
    first = ok[0]
    return dict(
        row, status="ok", num_params=n, runs=len(ok), failed_runs=len(runs) - len(ok),
        bytes_per_param={k: statistics.median(p[k] for p in per_run) for k in keys},
        spread_bytes_per_param={k: max(p[k] for p in per_run) - min(p[k] for p in per_run) for k in keys},
        static_bytes_per_param=first["static"]["total_bytes"] / n,
        static=first["static"],
        gradient_bytes_per_param=statistics.median(r["gradient_bytes"] for r in ok) / n,
        census_bytes_per_param={k: v / n for k, v in first["census"]["bytes"].items()},
        census=first["census"],
        census_varies=any(r["census"] != first["census"] for r in ok),
        breakdown_bytes_per_param={bar: {k: statistics.median(breakdown(r)[bar][k] for r in ok) / n
                                         for k in BAR_PARTS} for bar in BARS},
        peak_phase=max(PHASES, key=lambda p: statistics.median(r["transient"][p] for r in ok)),
        per_run=ok,
    )


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict) -> str:
    lines = [f"# Peak memory of a training step ({result['label'] or result['date']})", "",
             f"`{result['command']}`  ", f"{result['device']}, torch {result['torch']}, eco {result['commit']}, "
             f"{result['date']}; median of {result['repeats']} run(s), each arm in a fresh process.  ",
             f"Method: {result['method']}", "",
             "Bytes per model parameter. forward/backward/step: peak of that phase; whole: peak of a separate whole "
             "step; static: weights + optimizer state (`eco.memory_report`); saved: the census of tensors saved for "
             "backward (weight-sized copies / activations); spread: max - min of `whole` over the runs.", ""]
    for model_name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model_name]
        cfg = result["configs"][model_name]
        n = next((r["num_params"] for r in rows if r["status"] == "ok"), None)
        lines += [f"## {model_label(model_name, cfg)}", "",
                  (f"{n:,} parameters; " if n else "") + f"config: `{json.dumps(cfg)}`", "",
                  "| arm | forward | backward | step | whole | static | gradients | saved: weight copies | "
                  "saved: activations | peak phase | spread |", "|---|" + "---:|" * 10]
        for r in rows:
            if r["status"] != "ok":
                continue
            b, c = r["bytes_per_param"], r["census_bytes_per_param"]
            lines.append(
                f"| {r['arm']} | {b['forward']:.2f} | {b['backward']:.2f} | {b['step']:.2f} | **{b['whole']:.2f}** | "
                f"{r['static_bytes_per_param']:.2f} | {r['gradient_bytes_per_param']:.2f} | "
                f"{c['weight copies']:.2f} | {c['activations']:.2f} | {r['peak_phase']} | "
                f"{r['spread_bytes_per_param']['whole']:.2f} |")
        others = [r for r in rows if r["status"] != "ok"]
        if others:
            lines += [""] + [f"- {r['arm']}: {r['status']}: {r['reason']}" for r in others]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Two stacked bars per arm: the forward/backward peak and the step peak (see ``breakdown``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, [r for r in result["rows"] if r["model"] == m and r["status"] == "ok"]) for m in result["models"]]
    panels = [(m, rows) for m, rows in panels if rows]
    if not panels:
        return
    colors = dict(zip(BAR_PARTS, ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#937860", "#64b5cd"],
                      strict=True))
    heights = [len(rows) for _, rows in panels]
    height = 1.6 + 0.55 * sum(heights) + 0.8 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, height),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    for ax, (model_name, rows) in zip(axes[:, 0], panels, strict=True):
        right = 0.0
        for i, r in enumerate(rows):
            for j, bar in enumerate(BARS):
                y = i + (j - 0.5) * 0.38
                left = 0.0
                for part in BAR_PARTS:
                    width = r["breakdown_bytes_per_param"][bar][part]
                    ax.barh(y, width, left=left, height=0.36, color=colors[part],
                            label=part if (i, j) == (0, 0) else None)
                    left += width
                right = max(right, left)
                peak = left >= max(sum(r["breakdown_bytes_per_param"][b].values()) for b in BARS)
                ax.text(left + 0.1, y, f"{bar} {left:.1f}", va="center", fontsize=7,
                        fontweight="bold" if peak else "normal")
        ax.set_yticks(range(len(rows)), [r["arm"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, right * 1.25)
        n = rows[0]["num_params"]
        ax.set_title(f"{model_label(model_name, result['configs'][model_name])} ({n / 1e6:.1f}M parameters)",
                     fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("bytes per parameter: forward/backward peak and optimizer-step peak "
                           "(bold: the higher one, the whole step's peak)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(BAR_PARTS), fontsize=8)
    fig.suptitle(f"Peak memory of a training step, {result['device']} ({result['label'] or result['date']})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.15 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    print(f"\npeak bytes per parameter ({result['device']}, median of {result['repeats']})")
    header = f"{'model':8s} {'arm':44s} {'fwd':>6s} {'bwd':>6s} {'step':>6s} {'whole':>6s} {'static':>6s} " \
             f"{'copies':>6s} {'acts':>6s} {'spread':>6s}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        if r["status"] == "ok":
            b, c = r["bytes_per_param"], r["census_bytes_per_param"]
            print(f"{r['model']:8s} {r['arm']:44s} {b['forward']:6.2f} {b['backward']:6.2f} {b['step']:6.2f} "
                  f"{b['whole']:6.2f} {r['static_bytes_per_param']:6.2f} {c['weight copies']:6.2f} "
                  f"{c['activations']:6.2f} {r['spread_bytes_per_param']['whole']:6.2f}")
        else:
            print(f"{r['model']:8s} {r['arm']:44s} {r['status']}: {r['reason']}")


# ---------------------------------------------------------------- step temporaries
def step_temporaries_main(args, device: torch.device) -> dict:
    small = [int(s) for s in args.step_shape.split("x")]
    large = [small[0] * 8, *small[1:]]
    rows = []
    for fmt_name in args.step_formats.split(","):
        for backend in args.step_backends.split(","):
            per_element = 0.0  # measured on the small tensor: sizes the guard for the large one
            for shape in (small, large):
                row = dict(format=fmt_name, backend=backend, shape=shape)
                need = math.prod(shape) * (per_element + 12)  # + codes, bf16 gradient and states, fp32 init
                available = _available_memory(device)
                if available is not None and need > 0.7 * available:
                    row.update(status="skipped", reason=f"needs about {need / 2**30:.1f} GiB, "
                                                        f"{available / 2**30:.1f} GiB available")
                else:
                    spec = dict(mode="step", format=fmt_name, backend=backend, shape=shape, device=str(device),
                                threads=args.threads)
                    runs = [run_child(spec, args.timeout) for _ in range(args.repeats)]
                    ok = [r for r in runs if r["status"] == "ok"]
                    if ok:
                        temporaries = [r["temporaries_bytes"] for r in ok]
                        row.update(ok[0], status="ok", runs=len(ok), temporaries_bytes=statistics.median(temporaries),
                                   spread_bytes=max(temporaries) - min(temporaries))
                        row["bytes_per_element"] = row["temporaries_bytes"] / row["numel"]
                        per_element = max(per_element, row["bytes_per_element"])
                    else:
                        row.update(status="failed", reason=runs[0]["reason"])
                rows.append(row)
                _print_step_row(row)
    return dict(rows=rows, budget_bytes=64 * 2**20)


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _print_step_row(row: dict) -> None:
    shape = "x".join(map(str, row["shape"]))
    if row["status"] != "ok":
        print(f"{row['format']:10s} {row['backend']:9s} {shape:>14s}  {row['status']}: {row['reason']}", flush=True)
        return
    print(f"{row['format']:10s} {row['backend']:9s} {shape:>14s}  {row['temporaries_bytes'] / 2**20:9.1f} MiB  "
          f"{row['bytes_per_element']:6.1f} B/element  (spread {row['spread_bytes'] / 2**20:.1f} MiB)", flush=True)


def step_markdown(result: dict) -> str:
    title = result["label"] or result["date"]
    lines = [f"# Optimizer-step temporaries on one expert-shaped quantized weight ({title})", "",
             f"`{result['command']}`  ",
             f"{result['device']}, torch {result['torch']}, eco {result['commit']}, {result['date']}; "
             f"median of {result['repeats']} run(s), each in a fresh process; bf16 logical weight, bf16 gradient "
             "and bf16 states, stochastic rounding.  ",
             f"Method: {result['method']}: temporaries = peak during the second `optimizer.step()` (states "
             "allocated by the first) minus the memory before it. Target: at most 64 MiB, not growing "
             "with the tensor.", "",
             "| format | backend | shape | temporaries (MiB) | bytes/element | spread (MiB) |",
             "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        shape = "x".join(map(str, r["shape"]))
        if r["status"] == "ok":
            lines.append(f"| {r['format']} | {r['backend']} | {shape} | {r['temporaries_bytes'] / 2**20:.1f} | "
                         f"{r['bytes_per_element']:.1f} | {r['spread_bytes'] / 2**20:.1f} |")
        else:
            lines.append(f"| {r['format']} | {r['backend']} | {shape} | {r['status']}: {r['reason']} | | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def method(device: torch.device, mode: str) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated, reset before each phase, minus memory_allocated before the step"
                + ("; static bytes from eco.memory_report added back" if mode == "arms" else ""))
    text = ("Linux VmHWM reset before each phase (/proc/self/clear_refs), glibc MALLOC_MMAP_THRESHOLD_=65536 "
            "MALLOC_TRIM_THRESHOLD_=0, minus the resident set before the step (after imports and warm-up)")
    return text + ("; static bytes from eco.memory_report added back" if mode == "arms" else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--arms", default="*", help="comma-separated arm names or glob patterns (see --list)")
    parser.add_argument("--size", default="default", choices=list(SIZES), help="model sizes (tiny: for the tests)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per arm (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="full training steps before measuring")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch in each child")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--label", default="", help="a title for the results, e.g. 'before the memory work'")
    parser.add_argument("--out", default=None, help="output path without extension")
    parser.add_argument("--list", action="store_true", help="list the arms and whether they run here, then exit")
    parser.add_argument("--step-temporaries", action="store_true",
                        help="measure the optimizer step's temporaries on one expert-shaped quantized weight")
    parser.add_argument("--step-shape", default="x".join(map(str, EXPERT_SHAPE)),
                        help="--step-temporaries: the smaller shape (the other has 8x as many experts)")
    parser.add_argument("--step-formats", default=",".join(ECO_FORMATS), help="--step-temporaries: formats")
    parser.add_argument("--step-backends", default=None,
                        help="--step-temporaries: eco backends (default: auto and, on CPU, compiled)")
    parser.add_argument("--render", metavar="JSON", help="write the .md (and .png) of a saved result again, then exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child), Path(args.child_out))
        return {}
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        write_outputs(path.with_name(path.name.removesuffix(".json")), result, json_too=False)
        return result
    device = torch.device(args.device)
    mode = "step-temporaries" if args.step_temporaries else "arms"
    header = dict(
        mode=mode, label=args.label, date=datetime.date.today().isoformat(), commit=git_commit(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        device_type=device.type, method=method(device, mode), repeats=args.repeats, threads=args.threads,
        command=shlex.join(["python", "bench/peak_memory.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    if args.step_temporaries:
        args.step_backends = args.step_backends or ("auto,compiled" if device.type == "cpu" else "auto")
        result = dict(header, **step_temporaries_main(args, device))
        write_outputs(Path(args.out or RESULTS / "peak_memory_step_temporaries"), result)
        return result

    patterns = [p.strip() for p in args.arms.split(",") if p.strip()]
    arms = [a for a in all_arms() if any(fnmatch.fnmatchcase(a.name, p) for p in patterns)]
    if not arms:
        parser.error(f"no arm matches {args.arms!r}; --list shows them")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    reasons = {a.name: unavailable_reason(a, device) for a in arms}
    if args.list:
        for a in arms:
            print(f"{a.name:46s} {a.label}" + (f"\n{'':46s} unavailable: {reasons[a.name]}" if reasons[a.name] else ""))
        return {}
    for a in arms:
        if reasons[a.name]:
            print(f"{a.name}: unavailable: {reasons[a.name]}", flush=True)
    configs = {m: SIZES[args.size][m] for m in models}
    runs: dict = {(m, a.name): [] for m in models for a in arms}
    for repeat in range(args.repeats):  # interleaved: load on a shared machine hits every arm alike
        for model_name in models:
            for arm in arms:
                if reasons[arm.name]:
                    continue
                spec = dict(mode="arm", arm=arm.name, model=model_name, cfg=configs[model_name], device=str(device),
                            warmup=args.warmup, threads=args.threads)
                run = run_child(spec, args.timeout)
                runs[(model_name, arm.name)].append(run)
                if run["status"] == "ok":
                    n = run["static"]["num_params"]
                    p = peaks(run)
                    print(f"[{repeat + 1}/{args.repeats}] {model_name} {arm.name}: "
                          + ", ".join(f"{k} {p[k] / n:.2f}" for k in (*PHASES, "whole")) + " B/param", flush=True)
                else:
                    print(f"[{repeat + 1}/{args.repeats}] {model_name} {arm.name}: {run['status']}: {run['reason']}",
                          flush=True)
    rows = [summarize(m, a, runs[(m, a.name)], reasons[a.name]) for m in models for a in arms]
    result = dict(header, size=args.size, models=models, configs=configs, warmup=args.warmup, rows=rows)
    print_table(result)
    write_outputs(Path(args.out or RESULTS / "peak_memory"), result)
    return result


def write_outputs(out: Path, result: dict, json_too: bool = True) -> None:
    """``<out>.json``, ``<out>.md`` and, for the arms, ``<out>.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if json_too:
        written.append(_with_ext(out, "json"))
        written[-1].write_text(json.dumps(result, indent=1) + "\n")
    step_mode = result["mode"] == "step-temporaries"
    written.append(_with_ext(out, "md"))
    written[-1].write_text(step_markdown(result) if step_mode else markdown(result))
    if not step_mode:
        try:
            plot(result, _with_ext(out, "png"))
            written.append(_with_ext(out, "png"))
        except ImportError as exc:
            print(f"no plot: {exc}")
    print("wrote " + ", ".join(map(str, written)))


def _with_ext(out: Path, ext: str) -> Path:
    return out.with_name(f"{out.name}.{ext}")


if __name__ == "__main__":
    main(sys.argv[1:])
