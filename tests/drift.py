"""Drift of small updates: does a weight move by ``T * lr`` on average after ``T`` steps of a constant gradient?

Issue 16's measurement, vectorized over many elements. Every row of 128
columns holds anchors (every 32nd element) at the top of the grid with a zero
gradient, so each scale group's absmax, and with it the grid, never moves;
the other elements start at the middle of the grid, code 0, and get gradient
+1, so AdamW moves them down by ``lr`` per step (``m/sqrt(v) = 1``, weight
decay 0). ``lr`` is a fraction of the grid step there (E4M3: its subnormal
spacing, ``2**-9`` in code units). After ``BURN_IN`` steps (bias corrections
and the momentum's warm-up done) the drift over ``T`` more steps is the mean
over those elements of ``(deq(w_B) - deq(w_B+T)) / step``, in grid steps, with
its standard error; unbiased states give ``T * lr / step``.

Starting at 0 keeps ``w~ = w - lr`` exact in fp32: a weight far from 0 (say
E4M3 code 96) is 2**23 of its own fp32 ulps wide, so 1e-6 of a grid step is
about one ulp there and fp32 rounding of ``w~`` itself loses a few percent
(measured 0.951 +- 0.004 of the expected drift with fp32 states; any fp32
implementation, master weights included, does that).

Besides the drift of the stored weights (a count of rare grid crossings: about
900 / (lr / step) element-steps for 3 standard errors under 10%), it reports
the drift of the *position*: the stored weights plus the update m still holds
beyond its plain EMA of g, which ECO applies in the next steps. Its
expectation is the same (the held update is an unbiased rounding error), and
after the burn-in the weights' stochastic rounding cancels out of it (the
error it injects into m is exactly the move it did not make), so its noise is
the states' own: it resolves 1e-6 of a grid step in a few hundred steps.

Run as a script for the table: ``python -m tests.drift`` (``--help``); tests/test_drift.py asserts it.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

import eco
from eco import compiled, reference, states

COLS = 128
ANCHOR_EVERY = 32
#: (anchor code, grid step at code 0 in codes, scale) per weight format: a scale of exactly 2**-8 or 2**-4
GRIDS = {"fp8": (448.0, 2.0**-9, 2.0**-8), "int4": (7.0, 1.0, 2.0**-4)}


def start_weights(fmt, rows: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weights, mask of the moving elements, grid step) for a ``[rows, COLS]`` weight."""
    anchor, step_codes, scale = GRIDS[fmt.name]
    moving = torch.ones(rows, COLS, dtype=torch.bool)
    moving[:, ::ANCHOR_EVERY] = False
    w = torch.where(moving, 0.0, anchor * scale)
    return w, moving, step_codes * scale


BETA = 0.9
#: steps before the measured ones: bias corrections and momentum warm-up done (0.9**100 ~ 3e-5)
BURN_IN = 100


class Drift(NamedTuple):
    """One level's result; drifts in grid steps."""

    fraction: float  # lr / grid step
    steps: int
    elements: int
    expected: float  # steps * fraction
    weights: float  # mean drift of the stored weights
    weights_se: float
    position: float  # mean drift of the weights plus the update m still holds
    position_se: float


def measure(fmt, momentum: str, second_moment: str | None, levels: dict, *, burn_in: int = BURN_IN,
            optimizer: str = "adamw", backend=reference, seed: int = 0) -> list[Drift]:
    """The drift over ``steps`` steps after ``burn_in`` steps, at each level ``{lr / grid step: (rows, steps)}``."""
    runs = []
    for fraction, (rows, steps) in levels.items():
        w, moving, grid_step = start_weights(fmt, rows)
        shape = torch.Size(w.shape)
        codes, scales = fmt.quantize(w)
        m_fmt = states.for_shape(states.momentum_format(momentum), shape)
        v = None
        if optimizer == "adamw":
            v_fmt = states.for_shape(states.second_moment_format(second_moment), shape)
            v = reference.Moment(v_fmt, v_fmt.allocate(shape, "cpu"))
        runs.append(dict(fraction=fraction, steps=steps, w=w, moving=moving, grid_step=grid_step, shape=shape,
                         codes=codes, scales=scales, w0=fmt.dequantize(codes, scales, shape), grad=moving.float(),
                         m=reference.Moment(m_fmt, m_fmt.allocate(shape, "cpu")), v=v))
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, burn_in + max(run["steps"] for run in runs) + 1):
        for run in runs:
            if t > burn_in + run["steps"]:
                continue
            lr = run["fraction"] * run["grid_step"]
            step_seed = int(torch.randint(0, 2**62, (), generator=gen))
            if optimizer == "adamw":
                scalars = reference.adamw_scalars(lr=lr, beta1=BETA, beta2=0.999, eps=1e-12, weight_decay=0.0,
                                                  step=t)
                backend.adamw_step_(run["codes"], run["scales"], run["grad"], run["m"], run["v"], None, fmt=fmt,
                                    shape=run["shape"], scalars=scalars, rounding="stochastic", seed=step_seed)
            else:
                scalars = reference.sgd_scalars(lr=lr, momentum=BETA, weight_decay=0.0)
                backend.sgd_step_(run["codes"], run["scales"], run["grad"], run["m"], None, fmt=fmt,
                                  shape=run["shape"], scalars=scalars, rounding="stochastic", seed=step_seed)
            if t in (burn_in, burn_in + run["steps"]):
                run[t] = _displacements(fmt, run, t)
    out = []
    for run in runs:
        assert torch.equal(run["scales"], fmt.quantize(run["w"])[1]), "the anchors must keep every scale"
        stats = []
        end = burn_in + run["steps"]
        for kind in range(2):
            x = ((run[end][kind] - run[burn_in][kind]) / run["grid_step"])[run["moving"]]
            stats += [x.mean().item(), x.std().item() / x.numel() ** 0.5]
        out.append(Drift(run["fraction"], run["steps"], int(run["moving"].sum()), run["steps"] * run["fraction"],
                         *stats))
    return out


def _displacements(fmt, run: dict, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each element has moved down at step ``t``: stored weights, and position (weights + held update).

    What m holds beyond the plain EMA of g (``1 - BETA**t``), ECO applies in the next steps: ``lr * BETA /
    (1 - BETA)`` times it (m/d with d = 1, ``BETA**k`` summed over k >= 1, bias corrections done).
    """
    shape = run["shape"]
    moved = (run["w0"] - fmt.dequantize(run["codes"], run["scales"], shape)).double()
    m = run["m"]
    held = m.fmt.load(tuple(x.view(shape[0], -1) for x in m.tensors)).double() - (1.0 - BETA**t)
    return moved, moved + run["fraction"] * run["grid_step"] * BETA / (1 - BETA) * held


#: {lr / grid step: (rows of 128, measured steps)}: 3 standard errors under 10% of T * lr for the weights at
#: 1e-2 and 1e-4 and for the position at all three (the weights' count of crossings would need ~1e9
#: element-steps at 1e-6)
LEVELS = {1e-2: (8, 100), 1e-4: (100, 1000), 1e-6: (200, 500)}
WEIGHT_FORMATS = {"fp8_row": eco.FP8(), "fp8_block32": eco.FP8(group_size=32), "int4_tensor": eco.INT4(),
                  "int4_group32": eco.INT4(group_size=32)}
STATE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "fp8"), ("fp8", "factored")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="*", default=list(WEIGHT_FORMATS))
    parser.add_argument("--states", nargs="*", default=[f"{m}/{v}" for m, v in STATE_PAIRS])
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--scale-steps", type=float, default=1.0, help="multiply every level's steps")
    parser.add_argument("--scale-rows", type=float, default=1.0, help="multiply every level's rows")
    parser.add_argument("--backend", default="reference", choices=("reference", "compiled"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    backend = compiled if args.backend == "compiled" else reference
    print("| weight | m | v | lr / grid step | steps | elements | weights: drift / (T lr) | 3 SE | "
          "position: drift / (T lr) | 3 SE |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.formats:
        for pair in args.states:
            m_name, v_name = pair.split("/")
            levels = {f: (max(1, int(rows * args.scale_rows)), max(1, int(steps * args.scale_steps)))
                      for f, (rows, steps) in LEVELS.items()}
            for d in measure(WEIGHT_FORMATS[name], m_name, v_name, levels, optimizer=args.optimizer,
                             backend=backend):
                print(f"| {name} | {m_name} | {v_name if args.optimizer == 'adamw' else '-'} | {d.fraction:g} | "
                      f"{d.steps} | {d.elements} | {d.weights / d.expected:.3f} | "
                      f"{3 * d.weights_se / d.expected:.3f} | {d.position / d.expected:.3f} | "
                      f"{3 * d.position_se / d.expected:.3f} |", flush=True)


if __name__ == "__main__":
    main()
