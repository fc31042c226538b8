"""DistributedDataParallel with quantized weights and eco's optimizers: replicas stay identical.

Each of two gloo ranks seeds torch with its rank (as one does for data order and dropout), so each builds a
differently initialized model and draws different batches; DDP makes the replicas equal at construction and
averages the gradients; ``eco.AdamW(seed=None)`` with stochastic rounding must then round alike on every rank
(the ranks agree on the rounding seed by default), step after step.
"""

import torch
import torch.nn as nn

import eco
from tests.distributed_helpers import run_ranks
from tests.helpers import FORMATS


def _replica(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for fmt_name in ("int4-tensor", "fp8-row"):
        torch.manual_seed(rank)  # per-rank seeding: different init here, different data below
        model = eco.quantize_(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)), FORMATS[fmt_name])
        ddp = DistributedDataParallel(model)
        opt = eco.AdamW(ddp.parameters(), lr=1e-2, rounding="stochastic")
        for _ in range(4):
            x, y = torch.randn(16, 32), torch.randn(16, 8)
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        out[fmt_name] = {name: _bits(p) for name, p in model.named_parameters()}
    return out


def _bits(p):
    if isinstance(p, eco.QuantizedTensor):
        return p.codes.view(torch.uint8).clone(), p.scales.clone()
    return p.detach().clone()


def test_ddp_replicas_stay_identical_with_per_rank_seeds():
    first, second = run_ranks(_replica, 2)
    for fmt_name, params in first.items():
        for name, value in params.items():
            other = second[fmt_name][name]
            same = (torch.equal(value[0], other[0]) and torch.equal(value[1], other[1])) if isinstance(value, tuple) \
                else torch.equal(value, other)
            assert same, f"{fmt_name}: {name} differs between the replicas"
