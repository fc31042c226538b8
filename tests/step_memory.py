"""Temporary memory of one optimizer step on one tensor, measured as the process's peak RSS (VmHWM).

Run in a fresh process (``python -m tests.step_memory --shape 8 1024 2048 ...``): it builds one quantized
weight (bf16 gradient), takes a warm-up step (states allocated, lazy imports and caches done), resets the
peak through ``/proc/self/clear_refs`` and measures the peak above the RSS before the measured step. glibc
must return freed memory to the OS for RSS to follow live memory: the parent sets
``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` (:func:`measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(args) -> dict:
    import torch

    import eco
    from eco.formats import format_from_tag

    torch.set_num_threads(1)
    fmt = format_from_tag(args.format)
    shape = tuple(args.shape)
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    weight = torch.nn.Parameter(eco.QuantizedTensor.from_float(values, fmt))
    weight.grad = (torch.randn(shape, generator=gen) * 1e-3).to(torch.bfloat16)
    opt = eco.AdamW([weight], lr=1e-3, momentum=args.momentum, second_moment=args.second_moment,
                    backend=args.backend, seed=0)
    opt.step()  # warm-up: states, imports, compiled code
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    opt.step()
    peak = _status_kib("VmHWM")
    return {"shape": shape, "format": args.format, "momentum": args.momentum, "second_moment": args.second_moment,
            "backend": args.backend, "step_temporary_bytes": (peak - before) * 1024}


def measure(shape, fmt="fp8-row", momentum="bf16", second_moment="bf16", backend="auto") -> dict:
    """Run the measurement in a fresh process; returns its result dict."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.step_memory", "--shape", *map(str, shape), "--format", fmt,
           "--momentum", momentum, "--second-moment", second_moment, "--backend", backend]
    out = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 1024, 2048])
    parser.add_argument("--format", default="fp8-row", help="fp8-row, fp8-block<G>, int4-tensor, int4-group<G>")
    parser.add_argument("--momentum", default="bf16")
    parser.add_argument("--second-moment", default="bf16")
    parser.add_argument("--backend", default="auto")
    print(json.dumps(_child(parser.parse_args())))


if __name__ == "__main__":
    main()
