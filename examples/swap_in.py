"""The three-line change from ``torch.optim.AdamW`` to ECO, in a plain PyTorch training loop.

    # before
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    # after
    import eco
    eco.quantize_(model, eco.FP8())             # linear weights become FP8 codes + scales
    opt = eco.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

Nothing else in the loop changes: forward, ``loss.backward()``, ``opt.step()``,
``opt.zero_grad()``, gradient clipping and LR schedulers work as before.
This script trains the same small network both ways on a toy regression task
(a random teacher network) and prints the loss and the static memory of each.

    python examples/swap_in.py [--format fp8|int4] [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import eco


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> float:
    """An ordinary loop; returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(seed)
    teacher = make_model(32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=opt.defaults["lr"] * 0.1)
    tail = []
    for step in range(steps):
        x = torch.randn(128, 64, generator=generator)
        loss = nn.functional.mse_loss(model(x), teacher(x))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        scheduler.step()
        if step >= steps - 20:
            tail.append(loss.item())
    return sum(tail) / len(tail)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="torch.optim.AdamW vs eco.AdamW in a plain loop")
    parser.add_argument("--format", choices=["fp8", "int4"], default="fp8")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    results = {}

    torch.manual_seed(0)
    model = make_model(args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    results["torch.optim.AdamW (fp32)"] = (train(model, opt, args.steps), eco.memory_report(model, opt))

    torch.manual_seed(0)
    model = make_model(args.width)
    # ---- the change: two lines, plus `import eco` -------------------------------------
    eco.quantize_(model, eco.FP8() if args.format == "fp8" else eco.INT4(group_size=32))
    opt = eco.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, seed=0)
    # ------------------------------------------------------------------------------------
    results[f"eco.AdamW ({args.format}, no master)"] = (train(model, opt, args.steps), eco.memory_report(model, opt))

    print(f"{'optimizer':<32}{'final loss':>12}{'static bytes/param':>20}")
    for name, (loss, report) in results.items():
        print(f"{name:<32}{loss:>12.5f}{report.bytes_per_param:>20.3f}")
    return results


if __name__ == "__main__":
    main()
