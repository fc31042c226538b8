"""Kernel launches per optimizer step of eco.AdamW on MoE-like models, counted (no GPU needed).

    TRITON_INTERPRET=1 python bench/launch_count.py

Builds a decoder-like model whose experts are separate ``nn.Linear`` modules
(HF Mixtral/Qwen-MoE style), quantizes the expert linears (the paper's MoE
choice), gives every parameter a gradient and runs ``eco.AdamW(backend="triton")``
steps on CPU tensors with ``eco.kernels.launcher.launch`` replaced by a counter: the
kernels themselves do not run, so this counts launches and says nothing about
time (launch latency and the time saved need a GPU).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend='triton' on CPU tensors; set before eco.kernels loads

import torch  # noqa: E402
from torch import nn  # noqa: E402

import eco  # noqa: E402
from eco.formats import format_from_tag  # noqa: E402
from eco.kernels import launcher  # noqa: E402
from eco_bench import FORMAT_TAGS  # noqa: E402


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Layer(nn.Module):
    def __init__(self, hidden: int, experts: int, inter: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter) for _ in range(experts))


def model(layers: int, hidden: int, experts: int, inter: int, vocab: int = 1024) -> nn.Module:
    m = nn.Module()
    m.embed = nn.Embedding(vocab, hidden)
    m.layers = nn.ModuleList(Layer(hidden, experts, inter) for _ in range(layers))
    m.lm_head = nn.Linear(hidden, vocab, bias=False)
    return m


def count(layers, hidden, experts, inter, fmt, steps=2) -> tuple[int, int, Counter]:
    """Quantized and plain parameter counts and the launches per step, by kernel."""
    torch.manual_seed(0)
    m = eco.quantize_(model(layers, hidden, experts, inter), fmt, filter_fn=lambda name, p: ".experts." in name)
    params = list(m.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype) * 1e-3
    opt = eco.AdamW(params, lr=1e-3, rounding="nearest", state_dtype=torch.bfloat16, backend="triton")
    launched = Counter()
    real = launcher.launch
    launcher.launch = lambda spec, grid, **args: launched.update([spec.meta["kernel"]])
    try:
        for _ in range(steps):
            opt.step()
    finally:
        launcher.launch = real
    n_quantized = sum(isinstance(p, eco.QuantizedTensor) for p in params)
    return n_quantized, len(params) - n_quantized, Counter({k: v // steps for k, v in launched.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--inter", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"{args.layers} layers, hidden {args.hidden}, {args.experts} experts per layer of 3 nn.Linear "
          f"({args.inter} x {args.hidden} and back; {args.inter * args.hidden} elements each), experts quantized")
    print(f"{'format':14} {'quantized':>9} {'plain':>6}  launches per step (by kernel)")
    for name in FORMAT_TAGS:
        n_q, n_p, launched = count(args.layers, args.hidden, args.experts, args.inter, format_from_tag(name))
        print(f"{name:14} {n_q:9d} {n_p:6d}  {sum(launched.values()):5d}  "
              + ", ".join(f"{k} {v}" for k, v in sorted(launched.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
