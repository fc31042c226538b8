"""Static bytes per parameter of weights and optimizer state, by kind, from the tensors that exist.

    python bench/static_memory.py      # bench/results/static_memory.{json,md}

A stack of four ``nn.Linear(512, 512, bias=False)`` (1,048,576 parameters),
every weight quantized for the eco arms, after one optimizer step (every
state allocated), counted by :func:`eco.memory_report`: weight codes and
scales, master copies, m and v with their scales. Gradients and activations
are not static and not counted here (``bench/peak_memory.py`` measures them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn as nn

import eco

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH, DEPTH = 512, 4
BF16 = dict(state_dtype=torch.bfloat16)
# (label, weights: "fp32"/"bf16" or a format, optimizer: "torch" or eco.AdamW keyword arguments)
ARMS = [
    ("fp32 weights, torch.optim.AdamW", "fp32", "torch"),
    ("bf16 weights, torch.optim.AdamW (bf16 states)", "bf16", "torch"),
    ("FP8 row, ECO, fp32 states", eco.FP8(), {}),
    ("FP8 row, ECO, bf16 states", eco.FP8(), BF16),
    ("FP8 row + fp32 master, bf16 states", eco.FP8(), dict(BF16, master_weights=True)),
    ("FP8 block 128, ECO, bf16 states", eco.FP8(group_size=128), BF16),
    ("FP8 row, ECO, int8 m + factored v", eco.FP8(), dict(momentum="int8", second_moment="factored")),
    ("FP8 row, ECO, int8 m + fp8 v", eco.FP8(), dict(momentum="int8", second_moment="fp8")),
    ("INT4 tensor-wise, ECO, bf16 states", eco.INT4(), BF16),
    ("INT4 group 128, ECO, fp32 states", eco.INT4(group_size=128), {}),
    ("INT4 group 128, ECO, bf16 states", eco.INT4(group_size=128), BF16),
    ("INT4 group 128 + fp32 master, bf16 states", eco.INT4(group_size=128), dict(BF16, master_weights=True)),
    ("INT4 group 128, ECO, int8 m + factored v", eco.INT4(group_size=128),
     dict(momentum="int8", second_moment="factored")),
    ("INT4 group 128, ECO, int8 m + fp8 v", eco.INT4(group_size=128), dict(momentum="int8", second_moment="fp8")),
]
COLUMNS = {  # table column: memory_report kinds
    "weights": ("weight codes", "weight scales", "unquantized params"),
    "master": ("master weights",),
    "m": ("momentum (m)", "momentum scales"),
    "v": ("second moment (v)", "second moment scales", "second moment (factored)"),
}


def measure(weights, optimizer) -> eco.MemoryReport:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)]).to(dtype)
    if not isinstance(weights, str):
        eco.quantize_(model, weights)
    if optimizer == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = eco.AdamW(model.parameters(), lr=1e-3, **optimizer)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, dtype=dtype) * 1e-3
    opt.step()
    opt.zero_grad()
    return eco.memory_report(model, opt)


def markdown(result: dict) -> str:
    lines = [f"# Static bytes per parameter ({result['num_params']:,} parameters: {DEPTH} x nn.Linear({WIDTH}, "
             f"{WIDTH}), after one step)", "", f"`{result['command']}`, torch {result['torch']}", "",
             "| arm | weights | master | m | v | total |", "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        c = row["columns"]
        lines.append(f"| {row['arm']} | {c['weights']:.3f} | {c['master']:.3f} | {c['m']:.3f} | {c['v']:.3f} | "
                     f"**{row['bytes_per_param']:.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "static_memory"), help="output path without extension")
    args = parser.parse_args(argv)
    rows = []
    for label, weights, optimizer in ARMS:
        report = measure(weights, optimizer)
        per_kind = {kind: report.per_param(kind) for kind in report.bytes_by_kind}
        columns = {col: sum(per_kind.get(k, 0.0) for k in kinds) for col, kinds in COLUMNS.items()}
        assert abs(sum(columns.values()) - report.bytes_per_param) < 1e-9, (label, per_kind)  # every kind in a column
        rows.append(dict(arm=label, bytes_per_param=report.bytes_per_param, columns=columns,
                         bytes_per_param_by_kind=per_kind))
        print(f"{label:48s} {report.bytes_per_param:7.3f} B/param", flush=True)
    result = dict(command=shlex.join(["python", "bench/static_memory.py", *(argv or [])]), torch=torch.__version__,
                  num_params=report.num_params, rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(markdown(result))
    print(f"wrote {out}.json, {out}.md")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
