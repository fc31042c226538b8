"""Time ``optimizer.step()`` alone: eco.AdamW (kernel and reference paths) against torch AdamW and bitsandbytes.

The parameter set is the weight shapes of a Llama-style transformer (attention
q/k/v/o, gated MLP gate/up/down, RMSNorm weights, embedding and output head),
scaled to the device. Block linears are quantized for the eco arms (the
paper's choice); embedding, head and norms stay plain. Gradients are fixed
random tensors: only the step is timed.

Arms:

- ``eco/<format>/<state>/<path>``: eco.AdamW, stochastic rounding, bf16 logical
  weights and gradients; ``path`` is ``kernel`` (CUDA only), ``compiled`` (CPU,
  ``backend="compiled"``: the reference compiled by torch.compile, during the
  warm-up steps) or ``reference`` (eager, what ``backend="auto"`` runs on CPU).
- ``torch-foreach`` / ``torch-fused``: ``torch.optim.AdamW`` on fp32 parameters
  of the same shapes with fp32 gradients and states (the fp32 master weights of
  standard mixed precision); ``fused`` where the device has it (CUDA).
- ``bnb-adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` on bf16 parameters, when it runs.
- ``device-copy`` (CUDA): a device-to-device copy, the bandwidth ceiling.

Reported per arm: median step time over ``--runs`` (after warm-up; arms are
interleaved run by run so that load on a shared machine hits all alike; on CPU
the process CPU time of a one-thread step, which other processes do not inflate),
parameters per second, the wall time of the first warm-up step (``first_step_wall_s``: for the
compiled arms it includes compiling: tens of seconds with an empty inductor cache, a few with a warm one),
effective bandwidth (the bytes a fused step must move,
``eco.kernels.step_bytes``; 28 B/param for fp32 AdamW, 12 for bitsandbytes'
8-bit states with bf16 weights and gradients), and the ratio to torch AdamW
measured in the same run. Writes ``bench/results/step_speed_<device>.json`` (``_<config>`` appended for
a config other than the device's default).

Usage: ``python bench/step_speed.py`` (CPU: a small config, compiled and eager reference paths)
or on a GPU ``python bench/step_speed.py --config 1b``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import eco
from eco import compiled, kernels
from eco.formats import STATE_DTYPES, format_from_tag
from eco.kernels.specs import TRITON_DTYPES
from eco_bench import FORMAT_TAGS

CONFIGS = {  # hidden, intermediate, layers, vocab, heads, kv heads
    "cpu-small": dict(hidden=512, intermediate=1408, layers=2, vocab=8192, heads=8, kv_heads=4),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, vocab=128256, heads=32, kv_heads=8),  # Llama-3.2-1B
    # many small tensors: each layer's MLP is 32 experts (gate/up/down of 128 x 256) and a plain router
    "moe-small": dict(hidden=256, intermediate=128, layers=4, vocab=8192, heads=4, kv_heads=2, experts=32),
    "tiny": dict(hidden=64, intermediate=128, layers=1, vocab=128, heads=2, kv_heads=1),  # dry runs: the code path
}
STATES = {TRITON_DTYPES[dtype]: dtype for dtype in STATE_DTYPES}  # "bf16", "fp32"
BACKEND_OF_PATH = {"kernel": "triton", "compiled": "compiled", "reference": "reference"}


def random_tensor(shape, scale: float, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random values made on the generator's device (a 1B-parameter set takes seconds on one CPU thread)."""
    return (torch.randn(shape, generator=gen, device=gen.device) * scale).to(dtype)


def weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(name, shape, quantized)`` for every parameter of the model."""
    h, i, head_dim = cfg["hidden"], cfg["intermediate"], cfg["hidden"] // cfg["heads"]
    kv = cfg["kv_heads"] * head_dim
    shapes = [("embed", (cfg["vocab"], h), False)]
    for layer in range(cfg["layers"]):
        p = f"layers.{layer}."
        shapes += [(p + "q", (h, h), True), (p + "k", (kv, h), True), (p + "v", (kv, h), True), (p + "o", (h, h), True)]
        experts = [f"experts.{e}." for e in range(cfg["experts"])] if "experts" in cfg else [""]
        for e in experts:
            shapes += [(p + e + "gate", (i, h), True), (p + e + "up", (i, h), True), (p + e + "down", (h, i), True)]
        if "experts" in cfg:
            shapes.append((p + "router", (cfg["experts"], h), False))
        shapes += [(p + "attn_norm", (h,), False), (p + "mlp_norm", (h,), False)]
    return shapes + [("norm", (h,), False), ("lm_head", (cfg["vocab"], h), False)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Arm:
    """One optimizer on its own parameter set; ``step()`` is what is timed."""

    def __init__(self, name, params, optimizer, bytes_moved, note=""):
        self.name, self.params, self.optimizer, self.bytes_moved, self.note = name, params, optimizer, bytes_moved, note
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.first_step_wall_s: float | None = None

    def run(self, device):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.optimizer.step()
        synchronize(device)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)


def eco_arm(shapes, fmt_name, state_name, path, gen) -> Arm:
    fmt, state_dtype = format_from_tag(fmt_name), STATES[state_name]
    params, total_bytes = [], 0
    for _, shape, quantized in shapes:
        w = random_tensor(shape, 0.02, gen, torch.bfloat16)
        if quantized:
            p = torch.nn.Parameter(eco.QuantizedTensor.from_float(w, fmt))
            total_bytes += kernels.step_bytes(fmt, shape, states=(state_name, state_name))
        else:
            p = torch.nn.Parameter(w)
            total_bytes += kernels.plain_step_bytes(w.numel(), param_dtype=torch.bfloat16, state_dtype=state_dtype)
        p.grad = random_tensor(shape, 1e-3, gen, torch.bfloat16)
        params.append(p)
    opt = eco.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, rounding="stochastic",
                    state_dtype=state_dtype, seed=0, backend=BACKEND_OF_PATH[path])
    return Arm(f"eco/{fmt_name}/{state_name}/{path}", params, opt, total_bytes)


def torch_arm(shapes, impl, gen) -> Arm:
    params = []
    for _, shape, _ in shapes:
        p = torch.nn.Parameter(random_tensor(shape, 0.02, gen))
        p.grad = random_tensor(shape, 1e-3, gen)
        params.append(p)
    kwargs = {"foreach": True} if impl == "foreach" else {"fused": True}
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, **kwargs)
    n = sum(p.numel() for p in params)
    return Arm(f"torch-{impl}", params, opt, 28 * n, "fp32 params, grads, states (fp32 master weights)")


def bnb_arm(shapes, gen) -> Arm:
    import bitsandbytes as bnb

    params = []
    for _, shape, _ in shapes:
        p = torch.nn.Parameter(random_tensor(shape, 0.02, gen, torch.bfloat16))
        p.grad = random_tensor(shape, 1e-3, gen, torch.bfloat16)
        params.append(p)
    opt = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
    n = sum(p.numel() for p in params)
    return Arm("bnb-adamw8bit", params, opt, 12 * n, "bf16 params and grads, 8-bit blockwise states (bf16 weights, "
               "no master copy)")


def device_copy_bandwidth(device, runs: int) -> float | None:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(runs + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=None, help=f"one of {list(CONFIGS)} (default: by device)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMAT_TAGS))
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--paths", default=None,
                        help=f"eco paths, a subset of {list(BACKEND_OF_PATH)} (default: kernel and reference on "
                             "CUDA, compiled and reference on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a shared machine, a descheduled worker thread "
                             "stalls every op; the ratio between arms is taken at equal threads)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    default_config = "1b" if device.type == "cuda" else "cpu-small"
    config_name = args.config or default_config
    shapes = weight_shapes(CONFIGS[config_name])
    n_params = sum(math.prod(s) for _, s, _ in shapes)
    gen = torch.Generator(device).manual_seed(0)

    paths = ["reference"]
    skipped = {}
    if kernels.supports(torch.empty(0, device=device)):
        paths = ["kernel", "reference"]
    else:
        skipped["eco kernel path"] = f"not run on {device.type}: {kernels.unavailable_reason()}"
        if compiled.supports(torch.empty(0, device=device)):
            paths = ["compiled", "reference"]
        else:
            skipped["eco compiled path"] = f"not run: {compiled.unavailable_reason() or 'not a CPU device'}"
    if args.paths is not None:
        wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in BACKEND_OF_PATH]
        if unknown:
            parser.error(f"unknown path(s) {unknown}; choose from {list(BACKEND_OF_PATH)}")
        for path in set(paths) - set(wanted):
            skipped[f"eco {path} path"] = "not asked for (--paths)"
        paths = [p for p in paths if p in wanted]
    factories = []  # (name, build): arms are built lazily so that a GPU holds one parameter set at a time
    for impl in ("foreach", "fused"):
        if impl == "fused" and device.type != "cuda":
            skipped["torch-fused"] = "torch AdamW(fused=True) is timed on CUDA only"
            continue
        factories.append(lambda impl=impl: torch_arm(shapes, impl, gen))
    for fmt_name in args.formats.split(","):
        for state_name in args.states.split(","):
            for path in paths:
                factories.append(lambda f=fmt_name, s=state_name, p=path: eco_arm(shapes, f, s, p, gen))
    factories.append(lambda: bnb_arm(shapes, gen))

    def build_and_warm(factory):
        """The arm after its warm-up steps, or None (reason recorded) when it cannot run here."""
        try:
            arm = factory()
            for _ in range(args.warmup):
                arm.run(device)
        except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes without an 8-bit optimizer for this device
            name = "bnb-adamw8bit" if factory is factories[-1] else "an arm"
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            return None
        arm.first_step_wall_s = arm.times[0] if arm.times else None  # compiled arms compile here
        arm.times.clear()
        arm.cpu_times.clear()
        return arm

    arms = []
    if device.type == "cpu":  # small parameter sets: keep all, interleave the runs so machine load hits all alike
        arms = [a for a in map(build_and_warm, factories) if a is not None]
        for _ in range(args.runs):
            for arm in arms:
                arm.run(device)
    else:  # one arm in memory at a time
        for factory in factories:
            arm = build_and_warm(factory)
            if arm is None:
                continue
            for _ in range(args.runs):
                arm.run(device)
            arm.params = arm.optimizer = None
            arms.append(arm)
            torch.cuda.empty_cache()

    copy_bw = device_copy_bandwidth(device, args.runs)
    # On CPU the step runs on one thread: its CPU time is what it costs, whatever else loads the machine.
    timed = (lambda a: a.cpu_times) if device.type == "cpu" else (lambda a: a.times)
    baseline = {a.name: statistics.median(timed(a)) for a in arms}
    torch_ref = baseline.get("torch-fused") or baseline["torch-foreach"]
    rows = []
    for arm in arms:
        t = baseline[arm.name]
        rows.append(dict(
            arm=arm.name, median_s=t, min_s=min(timed(arm)), median_wall_s=statistics.median(arm.times),
            params_per_s=n_params / t,
            bytes_per_param=arm.bytes_moved / n_params, effective_GBps=arm.bytes_moved / t / 1e9,
            fraction_of_copy_bw=(arm.bytes_moved / t / copy_bw) if copy_bw else None,
            ratio_to_torch_foreach=t / baseline["torch-foreach"],
            speedup_vs_torch=torch_ref / t, first_step_wall_s=arm.first_step_wall_s, note=arm.note,
        ))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = dict(
        device=device_name, device_type=device.type, torch=torch.__version__, config=config_name,
        cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
        model=CONFIGS[config_name], n_params=n_params,
        n_quantized=sum(math.prod(s) for _, s, q in shapes if q), runs=args.runs, rounding="stochastic",
        timing="process CPU time, one thread" if device.type == "cpu" else "wall clock, CUDA synchronized",
        device_copy_GBps=copy_bw / 1e9 if copy_bw else None, skipped=skipped, rows=rows,
        command="python bench/step_speed.py " + " ".join(argv or []),
    )
    print_table(result)
    suffix = "" if args.config is None or args.config == default_config else f"_{config_name}"
    out = Path(args.out or Path(__file__).parent / "results" / f"step_speed_{device.type}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']} | config {result['config']} | {result['n_params'] / 1e6:.1f}M params "
          f"({result['n_quantized'] / 1e6:.1f}M quantized) | median of {result['runs']} runs | {result['timing']}")
    if result["device_copy_GBps"]:
        print(f"device-to-device copy: {result['device_copy_GBps']:.0f} GB/s")
    header = f"{'arm':32s} {'median ms':>10s} {'Mparam/s':>9s} {'B/param':>8s} {'GB/s':>7s} {'x torch-foreach':>16s}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['arm']:32s} {r['median_s'] * 1e3:10.1f} {r['params_per_s'] / 1e6:9.1f} {r['bytes_per_param']:8.1f} "
              f"{r['effective_GBps']:7.2f} {r['ratio_to_torch_foreach']:16.2f}")
    for name, why in result["skipped"].items():
        print(f"not run: {name}: {why}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
