"""Stochastic rounding in the kernels: unbiased, and the reference's bit for bit.

The kernels and the reference draw the same counter-based random numbers
(``eco.rng``: a hash of the stream's seed and the element's index), so their
stochastic steps must agree bit for bit; and the rounding must be unbiased.
Each weight here repeats one pattern of 32 values across every 32-element
group of every row, so one step rounds each value ``N = rows * cols / 32``
times independently, at exactly the same ``w~`` and scale. Per value the
rounding goes to one of the two grid neighbours ``lo <= w~ <= hi``, up with
probability ``p = (w~ - lo)/(hi - lo)``.

- Unbiased: the total error ``sum(q - w~)`` over all draws, divided by its
  standard deviation under the null, is a standard normal; |Z| < 5 must hold.
  Rounding down always (or to nearest) gives |Z| in the hundreds.
- Distribution: per value, the frequency of rounding up against the exact
  ``p`` (chi-square goodness of fit), below its 5-sigma quantile.
"""

from __future__ import annotations

import math

import pytest
import torch

import eco
from eco import kernels, reference
from tests.helpers import bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATTERN = 32
ROWS, COLS = 8, 2048
ADAM = dict(lr=0.02, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)


def repeated(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.repeat(ROWS, COLS // PATTERN)


def make_state(fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    w = repeated(torch.randn(PATTERN, generator=gen))
    codes, scales = fmt.quantize(w)
    state = dict(codes=codes, scales=scales, grad=repeated(torch.randn(PATTERN, generator=gen)),
                 exp_avg=repeated(torch.randn(PATTERN, generator=gen) * 0.01),
                 exp_avg_sq=repeated(torch.rand(PATTERN, generator=gen) * 1e-3))
    return {k: v.to(DEVICE) for k, v in state.items()}


def step(backend, optimizer, fmt, state, seed, master=None):
    state = {k: v.clone() for k, v in state.items()}
    shape = torch.Size((ROWS, COLS))
    if optimizer == "adamw":
        backend.adamw_step_(state["codes"], state["scales"], state["grad"], state["exp_avg"], state["exp_avg_sq"],
                            master, fmt=fmt, shape=shape, scalars=reference.adamw_scalars(step=3, **ADAM),
                            rounding="stochastic", seed=seed)
    else:
        backend.sgd_step_(state["codes"], state["scales"], state["grad"], state["exp_avg"], master, fmt=fmt,
                          shape=shape, scalars=reference.sgd_scalars(lr=0.05, momentum=0.9, weight_decay=0.0),
                          rounding="stochastic", seed=seed)
    return state


def draws(fmt, state) -> torch.Tensor:
    """Dequantized values as ``[draws, PATTERN]``."""
    values = fmt.dequantize(state["codes"], state["scales"], (ROWS, COLS)).double().cpu()
    return values.reshape(-1, PATTERN)


def w_tilde(optimizer, fmt, state) -> torch.Tensor:
    """The exact pre-rounding update: the reference with a master copy stores it there."""
    master = fmt.dequantize(state["codes"], state["scales"], (ROWS, COLS))
    step(reference, optimizer, fmt, state, seed=None, master=master)  # returns a copy; master is updated in place
    target = master.double().cpu().reshape(-1, PATTERN)
    assert (target == target[:1]).all(), "the pattern must give the same w~ at every repetition"
    return target[0]


def chi2_limit(df: int) -> float:
    """About the 5-sigma upper quantile of a chi-square with ``df`` degrees of freedom."""
    return df + 5 * math.sqrt(2 * df) + 10


@pytest.mark.parametrize("optimizer, fmt", [
    ("adamw", eco.FP8()), ("adamw", eco.FP8(block_size=32)), ("adamw", eco.INT4()),
    ("adamw", eco.INT4(group_size=32)), ("sgd", eco.FP8()), ("sgd", eco.INT4(group_size=64)),
], ids=lambda x: str(x))
def test_stochastic_rounding_is_unbiased_and_matches_the_reference(optimizer, fmt):
    state = make_state(fmt, seed=11)
    target = w_tilde(optimizer, fmt, state)
    ker_state = step(kernels, optimizer, fmt, state, seed=1234)
    ref_state = step(reference, optimizer, fmt, state, seed=1234)
    for key in ker_state:
        assert torch.equal(bits(ker_state[key]), bits(ref_state[key])), key
    ker, ref = draws(fmt, ker_state), draws(fmt, ref_state)
    n = ker.shape[0]

    # Every draw is one of the two grid neighbours of w~ (seen over both samples).
    lo = torch.minimum(ker.min(0).values, ref.min(0).values)
    hi = torch.maximum(ker.max(0).values, ref.max(0).values)
    assert ((ker == lo) | (ker == hi)).all() and ((ref == lo) | (ref == hi)).all()
    spread = hi > lo  # both neighbours seen (a value a hair from a grid point may only ever round one way)
    assert (lo <= target)[spread].all() and (target <= hi)[spread].all()
    nearest = fmt.dequantize(*fmt.quantize(state_values(target, fmt)), (ROWS, COLS)).double().cpu()[0, :PATTERN]
    assert ((nearest == lo) | (nearest == hi))[spread].all(), "rounding must go to the nearest grid points"
    assert spread.sum() >= PATTERN // 2, "most values should not sit on the grid"

    # Unbiased: total error over all draws against its null standard deviation.
    p = torch.where(spread, (target - lo) / (hi - lo), torch.zeros_like(target)).clamp(0, 1)
    variance = ((hi - lo) ** 2 * p * (1 - p)).sum() * n
    z = (ker - target)[:, spread].sum() / variance.sqrt()
    assert abs(z) < 5, f"kernel stochastic rounding is biased: z = {z:.1f}"

    # Distribution: up-rounding frequencies against the exact p.
    up_ker = (ker == hi).double().mean(0)
    usable = spread & (p * n >= 5) & ((1 - p) * n >= 5)
    df = int(usable.sum())
    gof = (((up_ker - p) ** 2) / (p * (1 - p) / n))[usable].sum()
    assert gof < chi2_limit(df), f"kernel rounding frequencies differ from p: chi2 = {gof:.0f} (df {df})"


def state_values(pattern_values: torch.Tensor, fmt) -> torch.Tensor:
    """The full weight holding ``pattern_values`` everywhere (for a nearest-rounding comparison)."""
    return repeated(pattern_values.float())


def test_stochastic_rounding_is_reproducible_and_seeded():
    fmt = eco.INT4(group_size=32)
    state = make_state(fmt, seed=12)
    a = step(kernels, "adamw", fmt, state, seed=7)
    b = step(kernels, "adamw", fmt, state, seed=7)
    c = step(kernels, "adamw", fmt, state, seed=8)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["exp_avg"], b["exp_avg"])
    assert not torch.equal(a["codes"], c["codes"])
