"""Issue 14 item 11: data-parallel replicas must agree on the stochastic-rounding stream by default.

Two gloo processes on CPU seed torch with their rank (as one does for the data
order), build the same quantized model and ``eco.AdamW(seed=None)``, and step
on the same gradients: their codes and scales must stay identical.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import eco


def _replica(rank: int, world: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = eco.quantize_(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)), eco.INT4(group_size=32))
        torch.manual_seed(rank)  # per-rank seeding, e.g. for the data order
        opt = eco.AdamW(model.parameters(), lr=1e-2, rounding="stochastic")
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 32, generator=data), torch.randn(16, 8, generator=data)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.save({n: (p.codes, p.scales) for n, p in eco.quantized_parameters(model)},
                   os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_replicas_round_alike_with_per_rank_seeds():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_replica, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        first, second = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), f"{name} codes differ between ranks"
        assert torch.equal(first[name][1], second[name][1]), f"{name} scales differ between ranks"
