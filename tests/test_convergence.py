"""ECO trains where naive master-weight removal stalls: a quadratic and a small network."""

import math

import pytest
import torch
import torch.nn as nn

import eco

ARMS = {  # name: (error_feedback, master_weights, rounding)
    "master": (True, True, "nearest"),
    "eco_sr": (True, False, "stochastic"),
    "eco_rtn": (True, False, "nearest"),
    "naive_rtn": (False, False, "nearest"),
}


def cosine(steps, floor=0.1, warmup=0):
    def factor(t):
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / steps))
        return min(1.0, (t + 1) / max(warmup, 1)) * decay
    return factor


def quadratic_run(fmt, arm, steps=300, seed=0):
    """SGDM on 0.5*||W - W*||^2 with noisy gradients from a nearby start; returns the final loss of deq(W)."""
    error_feedback, master, rounding = ARMS[arm]
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(16, 64, generator=gen)
    p = nn.Parameter(eco.QuantizedTensor.from_float(target + 0.5 * torch.randn(16, 64, generator=gen), fmt))
    opt = eco.SGD([p], lr=0.05, momentum=0.9, rounding=rounding, error_feedback=error_feedback,
                  master_weights=master, seed=seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    for _ in range(steps):
        p.grad = (p.dequantize() - target) + 0.05 * torch.randn(16, 64, generator=gen)
        opt.step()
        sched.step()
    return 0.5 * float(((p.dequantize() - target) ** 2).mean())


@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(group_size=32)], ids=str)
def test_quadratic_naive_stalls_and_eco_lands_near_master(fmt):
    loss = {arm: quadratic_run(fmt, arm) for arm in ARMS}
    start = 0.5 * 0.25  # 0.5 * E[(0.5 z)^2]
    assert loss["naive_rtn"] > 0.3 * start, loss          # naive RTN barely moves
    assert loss["naive_rtn"] > 5 * loss["master"], loss
    assert loss["eco_sr"] < 1.25 * loss["master"], loss   # ECO + SR lands with master weights
    assert loss["eco_rtn"] < 0.25 * loss["naive_rtn"], loss


def classification_task(seed=0, n=2048, dim=128, classes=10):
    """Noisy labels from a random teacher: a learnable task with a loss floor well above zero."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, 64, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=gen) * 3 / math.sqrt(64)
    x = torch.randn(n, dim, generator=gen)
    probs = torch.softmax(torch.tanh(x @ w1) @ w2, dim=-1)
    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return x, y


def train_classifier(fmt, arm, steps=300, lr=3e-3, batch=128):
    x, y = classification_task()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    kwargs = dict(lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    if fmt is None:
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
    else:
        error_feedback, master, rounding = ARMS[arm]
        eco.quantize_(model, fmt, filter_fn=lambda name, p: p.dim() == 2)
        opt = eco.AdamW(model.parameters(), rounding=rounding, error_feedback=error_feedback,
                        master_weights=master, state_dtype=torch.bfloat16, seed=0, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, warmup=20))
    order = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=order)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


# Measured on this task (cross-entropy; fp32 AdamW 0.668): FP8 ECO+SR 0.672, naive RTN 1.30;
# INT4 g128 ECO+SR 0.698, INT4 with master weights 0.676, naive RTN 3.14.
@pytest.mark.parametrize(("fmt", "eco_margin"), [(eco.FP8(), 1.03), (eco.INT4(group_size=128), 1.08)], ids=str)
def test_small_network_eco_close_to_fp32_naive_clearly_worse(fmt, eco_margin):
    fp32 = train_classifier(None, None)
    eco_sr = train_classifier(fmt, "eco_sr")
    naive = train_classifier(fmt, "naive_rtn")
    assert eco_sr < eco_margin * fp32, (eco_sr, fp32)
    assert naive > 1.5 * fp32, (naive, fp32)
