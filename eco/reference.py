"""The ECO update in plain torch: the single source of truth.

Every function here updates its tensors in place, exactly as a fused kernel
does. The compiled CPU path (``eco.compiled``) runs these very functions
through ``torch.compile``; the Triton kernels (``eco.kernels``) mirror them.
All three must give the same bits: the sections below are the contract
(docs/design.md gives the overview).

Arithmetic is fp32 with every host scalar rounded to fp32 once (the
``*Scalars`` tuples below). Each line is one rounding, in the order written,
with no fused multiply-add: a kernel that wants bit-identical results must
evaluate the same expressions in the same order.

ECO-AdamW for a quantized weight ``w`` (docs/method.md, Algorithm 3)::

    m~  = b1 * m + (1 - b1) * g
    v'  = min(b2 * v + (1 - b2) * (g * g), SAT)         # v: the stored v, or row*col/mean (factored)
    d   = sqrt(min(v' * inv_bc2, SAT)) + eps            # inv_bc2 = 1 / (1 - b2**t)
    w~  = clamp(deq(w) * decay - step_size * (m~ / d), -SAT, SAT)   # decay = 1 - lr*wd, step_size = lr/bc1
    w'  = q(w~)                                          # new codes and scales
    e   = w~ - deq(w')
    m'  = clamp(m~ + (inject * d) * e, -SAT, SAT)        # inject = (bc1 / lr) * (1 - 1/b1)

then m' and v' are stored in their state formats (``eco.states``: stochastic
rounding below fp32). With ``master`` (an fp32 copy) the base is ``master``
instead of ``deq(w)``, ``master`` becomes ``w~`` and nothing is injected;
with ``error_feedback=False`` (naive removal) nothing is injected either.

Nothing overflows (``SAT = 2**126``): given finite inputs whose gradients
satisfy ``|g| < GRAD_LIMIT`` (the optimizer checks that in its pre-step
reduction, under its ``nonfinite`` policy) and coefficients that
:func:`check_scalars` accepts (finite in fp32, ``|inject| <= INJECT_LIMIT``,
``step_size > 0``, ``|decay| <= 1``, ``eps <= 2**63``), every value above is
finite or a signed infinity that the next ``min``/``clamp`` saturates; no
``inf * 0`` and no ``inf - inf`` can occur, so no NaN, and every stored value
stays within ``SAT`` (which keeps the next step's inputs in range). The
``min``/``clamp`` change nothing for values below ``2**126``.

Pieces: a tensor is viewed as ``[rows, cols]`` (cols = its last dimension; a
1-D tensor whose length is a multiple of ``STATE_BLOCK`` as rows of
``STATE_BLOCK``) and stepped in pieces of whole rows that never straddle a
matrix (the last two dimensions), at most ``PIECE_ELEMENTS`` elements or one
row or one matrix: the step's temporary memory is bounded whatever the
tensor's size. Every value is a function of the element, its group and exact
reductions (max, integer sums), and the random streams are indexed by the
element's global position, so any split gives the same bits. Tensor-wise
INT4 split inside a matrix takes two passes over the pieces: the first
reduces ``|w~|`` per matrix, the second quantizes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from . import rng
from .formats import QuantFormat
from .states import BF16_STATE, FP32_STATE, STATE_BLOCK, Factored, StateFormat, sqrt_rn

#: A gradient element must satisfy ``|g| < GRAD_LIMIT`` (so ``g*g < 2**126``); larger ones are refused like NaN.
GRAD_LIMIT = 2.0**63
#: Computed values saturate here (see module docstring).
SATURATION = 2.0**126
#: Largest |injection coefficient| a step runs with: ``|inject * d| <= 2**62 * (2**63 + eps)`` stays finite.
INJECT_LIMIT = 2.0**62
#: Elements per piece (whole rows; see module docstring).
PIECE_ELEMENTS = 1 << 18
#: ``reduce(tensor, op)``: all-reduce ``tensor`` in place over the shards of one logical tensor, op "max" or "sum".
Reduce = Callable[[torch.Tensor, str], None]


class AdamWScalars(NamedTuple):
    """Host-side coefficients of one AdamW step, each used as an fp32 value."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bc2: float
    eps: float
    decay: float
    step_size: float
    inject: float  # 0.0 when nothing is injected


class SGDScalars(NamedTuple):
    """Host-side coefficients of one SGD-momentum step."""

    beta: float
    one_minus_beta: float
    weight_decay: float
    lr: float
    inject: float  # alpha = (1/lr) * (1 - 1/beta); 0.0 when nothing is injected


def adamw_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    inject: bool = True, decay_corrected_injection: bool = False,
) -> AdamWScalars:
    """Coefficients for step ``step`` (>= 1). ``lr == 0`` gives ``inject == 0``."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    decay = 1.0 - lr * weight_decay
    coef = 0.0
    if inject and lr != 0.0:
        coef = (bc1 / lr) * (1.0 - 1.0 / beta1)
        if decay_corrected_injection:
            coef *= decay
    return AdamWScalars(
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        inv_bc2=1.0 / bc2, eps=eps, decay=decay, step_size=lr / bc1, inject=coef,
    )


def sgd_scalars(*, lr: float, momentum: float, weight_decay: float, inject: bool = True) -> SGDScalars:
    coef = (1.0 / lr) * (1.0 - 1.0 / momentum) if (inject and lr != 0.0) else 0.0
    return SGDScalars(beta=momentum, one_minus_beta=1.0 - momentum, weight_decay=weight_decay, lr=lr, inject=coef)


def check_scalars(scalars: AdamWScalars | SGDScalars) -> str | None:
    """Why these coefficients cannot run a step without overflow in fp32 (a noun phrase), or None when they can.

    The optimizer treats a reason like a non-finite gradient (its ``nonfinite``
    policy): the step changes nothing, or raises.
    """
    if not abs(scalars.inject) <= INJECT_LIMIT:
        return ("a learning rate too small for ECO's error feedback in fp32 (the injection coefficient "
                f"(bc1/lr)(1 - 1/beta) = {scalars.inject:.3g} exceeds 2**62 in magnitude; use a learning-rate "
                "floor, lr=0 to freeze the weights, or error_feedback=False)")
    f32 = {name: float(np.float32(value)) for name, value in scalars._asdict().items()}
    bad = [name for name, value in f32.items() if not np.isfinite(value)]
    if bad:
        return f"coefficients {bad} that are not finite in fp32 ({scalars})"
    if isinstance(scalars, AdamWScalars):
        if f32["beta1"] >= 1.0 or f32["beta2"] >= 1.0:
            return f"betas ({scalars.beta1}, {scalars.beta2}) that round to 1 in fp32"
        if not 0.0 < f32["eps"] <= 2.0**63:
            return f"eps={scalars.eps} outside (0, 2**63] in fp32"
        if scalars.step_size > 0.0 and f32["step_size"] == 0.0:
            return f"a step size lr/(1 - beta1**t) = {scalars.step_size:.3g} that underflows to 0 in fp32"
        if not -1.0 <= f32["decay"] <= 1.0:
            return f"lr * weight_decay above 2 (the weight decay factor 1 - lr*wd is {scalars.decay})"
    else:
        if f32["beta"] >= 1.0:
            return f"a momentum {scalars.beta} that rounds to 1 in fp32"
        if scalars.lr > 0.0 and f32["lr"] == 0.0:
            return f"lr={scalars.lr:.3g} that underflows to 0 in fp32"
        if f32["weight_decay"] > 1.0:
            return f"an SGD weight_decay above 1 ({scalars.weight_decay})"
    return None


def coefficients(scalars: AdamWScalars | SGDScalars):
    """``scalars`` with every field as an fp32 0-d tensor: exactly the value a kernel receives.

    The piece functions take these, so that a compiled caller passes new
    values each step as inputs instead of recompiling for each one.
    """
    return type(scalars)(*(torch.tensor(x, dtype=torch.float32) for x in scalars))


# ------------------------------------------------------------------ states of one parameter
class Moment(NamedTuple):
    """One optimizer state (m or v) of one parameter: its format and the tensors that hold it."""

    fmt: StateFormat
    tensors: tuple


def as_moment(x: torch.Tensor | Moment) -> Moment:
    """A plain fp32/bf16 tensor (how the kernels and older callers pass a state) as a :class:`Moment`."""
    if isinstance(x, Moment):
        return x
    if x.dtype == torch.float32:
        return Moment(FP32_STATE, (x,))
    if x.dtype == torch.bfloat16:
        return Moment(BF16_STATE, (x,))
    raise ValueError(f"a state passed as a tensor must be fp32 or bf16, got {x.dtype}; pass a reference.Moment")


# ------------------------------------------------------------------ the element math (shared by every piece)
def _adam_moments(g, m, v, k: AdamWScalars):
    m_new = k.beta1 * m + k.one_minus_beta1 * g
    v_new = torch.clamp_max(k.beta2 * v + k.one_minus_beta2 * (g * g), SATURATION)
    d = sqrt_rn(torch.clamp_max(v_new * k.inv_bc2, SATURATION)) + k.eps
    return m_new, v_new, d


def _sgd_momentum(g, m, w, k: SGDScalars, decays: bool):
    """``beta*m + (1-beta)*(g + wd*w)``; the weight-decay term only when ``decays``."""
    if decays:
        g = g + k.weight_decay * w
    return k.beta * m + k.one_minus_beta * g


def _saturate(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, -SATURATION, SATURATION)


class PieceConfig(NamedTuple):
    """Everything static about the computation of one piece (hashable: the compiled path caches on it)."""

    fmt: QuantFormat | None  # None: a plain (unquantized) parameter
    m_fmt: StateFormat
    v_fmt: StateFormat | None  # None: SGD
    rounding: str
    update_weight: bool
    injects: bool
    decays: bool  # SGD: a weight-decay term in the momentum
    mats: int  # whole matrices in the piece; 0: a row range inside one matrix
    absmax_given: bool  # tensor-wise scales from the first pass
    fixed_point_bits: int  # F of the factored-v sums (0 without factored v)


def _weight_groups(x: torch.Tensor, cfg: PieceConfig) -> torch.Tensor:
    """A ``[P, C]`` piece as ``[groups, elements]``, one group per scale, in row-major order."""
    fmt = cfg.fmt
    if fmt.tensorwise:
        return x.reshape(max(cfg.mats, 1), -1)
    return x.reshape(-1, fmt.group_size or x.shape[-1])


def _dequantize(codes, scales, cfg: PieceConfig, shape) -> torch.Tensor:
    grid = cfg.fmt.decode(codes, shape)
    return (_weight_groups(grid, cfg) * scales.reshape(-1, 1)).reshape(shape)


def _requantize(w_tilde, codes, scales, absmax, key, cfg: PieceConfig) -> torch.Tensor:
    """Store ``q(w~)`` of a piece in ``codes`` and ``scales``; returns ``deq(w')`` (decoded from the codes)."""
    fmt = cfg.fmt
    groups = _weight_groups(w_tilde, cfg)
    if absmax is None:
        absmax = groups.abs().amax(dim=1, keepdim=True)
    scale, inv_scale = fmt.scale_pair(absmax)
    y = (groups * inv_scale).clamp(-fmt.rho, fmt.rho)
    if cfg.rounding == "nearest":
        grid = fmt.round_nearest(y)
    else:
        grid = fmt.round_stochastic(y, None, uniform=lambda t: rng.uniform(key, t.shape, t.device))
    codes.copy_(fmt.encode(grid.reshape(w_tilde.shape)))
    scales.copy_(scale.reshape(scales.shape))
    return _dequantize(codes, scales, cfg, w_tilde.shape)


def _old_v(v: tuple, cfg: PieceConfig, shape) -> torch.Tensor:
    """The v a step starts from: the stored one, or ``row * (col / mean)`` of a factored state."""
    if not isinstance(cfg.v_fmt, Factored):
        return cfg.v_fmt.load(v)
    row, col, mean = v
    mean = mean.reshape(-1, 1)
    norm = torch.where(mean > 0, col / mean, torch.zeros_like(col))
    n = col.shape[0]
    return (row.reshape(n, -1, 1) * norm.reshape(n, 1, shape[1])).reshape(shape)


def _store_v(v: tuple, v_new, g, key, fixed_point, cfg: PieceConfig):
    """Store v' (dense formats), or return this piece's fixed-point sums of g*g (factored)."""
    if not isinstance(cfg.v_fmt, Factored):
        cfg.v_fmt.store_(v, v_new, key)
        return None
    scale_down = fixed_point[0].reshape(-1, 1, 1)  # 2**-(e+1) per matrix
    n = v[1].shape[0]
    y = g.reshape(n, -1, g.shape[1]) * scale_down
    q = torch.floor((y * y) * (2.0 ** cfg.fixed_point_bits) + rng.uniform(key, y.shape, y.device)).to(torch.int64)
    return q.sum(dim=2).reshape(-1), q.sum(dim=1)


def adamw_piece_(codes, scales_old, scales, grad, m: tuple, v: tuple, master, k: AdamWScalars, keys, absmax,
                 fixed_point, *, cfg: PieceConfig):
    """One piece ``[P, C]`` of an ECO-AdamW step (module docstring). Returns the factored-v sums, or None."""
    shape = grad.shape
    g = grad.float()
    m_tilde, v_new, d = _adam_moments(g, cfg.m_fmt.load(m), _old_v(v, cfg, shape), k)
    m_new = m_tilde
    if cfg.update_weight:
        base = master if master is not None else _dequantize(codes, scales_old, cfg, shape)
        w_tilde = _saturate(base * k.decay - k.step_size * (m_tilde / d))
        if master is not None:
            master.copy_(w_tilde)
        deq_new = _requantize(w_tilde, codes, scales, absmax, keys[0], cfg)
        if cfg.injects:
            m_new = _saturate(m_tilde + (k.inject * d) * (w_tilde - deq_new))
    cfg.m_fmt.store_(m, m_new, keys[1])
    return _store_v(v, v_new, g, keys[2], fixed_point, cfg)


def adamw_absmax(codes, scales_old, grad, m: tuple, v: tuple, master, k: AdamWScalars, *, cfg: PieceConfig):
    """First pass of a split tensor-wise step: ``max |w~|`` of the piece (its w~ is the second pass's, bit for bit)."""
    shape = grad.shape
    m_tilde, _, d = _adam_moments(grad.float(), cfg.m_fmt.load(m), _old_v(v, cfg, shape), k)
    base = master if master is not None else _dequantize(codes, scales_old, cfg, shape)
    w_tilde = _saturate(base * k.decay - k.step_size * (m_tilde / d))
    return _weight_groups(w_tilde, cfg).abs().amax(dim=1, keepdim=True)


def sgd_piece_(codes, scales_old, scales, grad, m: tuple, v, master, k: SGDScalars, keys, absmax, fixed_point, *,
               cfg: PieceConfig):
    """One piece of an ECO-SGDM step: ``m~ = beta*m + (1-beta)*(g + wd*w)``, ``w~ = w - lr*m~``,
    ``w' = q(w~)``, ``m' = m~ + alpha*(w~ - deq(w'))`` with ``alpha = (1/lr)(1 - 1/beta)`` (saturated as AdamW)."""
    shape = grad.shape
    base = master if master is not None else _dequantize(codes, scales_old, cfg, shape)
    m_tilde = _sgd_momentum(grad.float(), cfg.m_fmt.load(m), base, k, cfg.decays)
    m_new = m_tilde
    if cfg.update_weight:
        w_tilde = _saturate(base - k.lr * m_tilde)
        if master is not None:
            master.copy_(w_tilde)
        deq_new = _requantize(w_tilde, codes, scales, absmax, keys[0], cfg)
        if cfg.injects:
            m_new = _saturate(m_tilde + k.inject * (w_tilde - deq_new))
    cfg.m_fmt.store_(m, m_new, keys[1])


def sgd_absmax(codes, scales_old, grad, m: tuple, v, master, k: SGDScalars, *, cfg: PieceConfig):
    shape = grad.shape
    base = master if master is not None else _dequantize(codes, scales_old, cfg, shape)
    m_tilde = _sgd_momentum(grad.float(), cfg.m_fmt.load(m), base, k, cfg.decays)
    return _weight_groups(_saturate(base - k.lr * m_tilde), cfg).abs().amax(dim=1, keepdim=True)


def plain_adamw_piece_(param, scales_old, scales, grad, m: tuple, v: tuple, master, k: AdamWScalars, keys, absmax,
                       fixed_point, *, cfg: PieceConfig):
    """Ordinary AdamW (decoupled weight decay) on a piece of an unquantized parameter."""
    g = grad.float()
    m_new, v_new, d = _adam_moments(g, cfg.m_fmt.load(m), _old_v(v, cfg, grad.shape), k)
    param.copy_(param.float() * k.decay - k.step_size * (m_new / d))
    cfg.m_fmt.store_(m, m_new, keys[1])
    return _store_v(v, v_new, g, keys[2], fixed_point, cfg)


def plain_sgd_piece_(param, scales_old, scales, grad, m: tuple, v, master, k: SGDScalars, keys, absmax,
                     fixed_point, *, cfg: PieceConfig):
    """SGD with EMA momentum (torch SGD with ``dampening=momentum``) on a piece of an unquantized parameter."""
    m_new = _sgd_momentum(grad.float(), cfg.m_fmt.load(m), param.float(), k, cfg.decays)
    param.copy_(param.float() - k.lr * m_new)
    cfg.m_fmt.store_(m, m_new, keys[1])


PIECE_FUNCTIONS = {"adamw": adamw_piece_, "sgd": sgd_piece_, "plain_adamw": plain_adamw_piece_,
                   "plain_sgd": plain_sgd_piece_}
ABSMAX_FUNCTIONS = {"adamw": adamw_absmax, "sgd": sgd_absmax}


# ------------------------------------------------------------------ factored v: exact sums of g*g
def fixed_point_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2**-(e+1), 2**(e+1))`` per matrix, ``e`` the binary exponent of ``max |g|`` (clamped to [-64, 63]).

    ``g * 2**-(e+1)`` is below 1 in magnitude, so ``floor((g * 2**-(e+1))**2 * 2**F + u)``
    fits ``F`` bits; built on the fp32 bits, no host sync.
    """
    exponent = (((amax.view(torch.int32) >> 23) & 0xFF) - 127).clamp(-64, 63) + 1
    return ((127 - exponent) << 23).view(torch.float32), ((127 + exponent) << 23).view(torch.float32)


def fixed_point_bits(rows: int, cols: int) -> int:
    """F: a matrix's sums of at most ``rows * cols`` terms below ``2**F + 1`` stay below ``2**62``."""
    return 62 - (rows * cols).bit_length()


def _finalize_factored_(v: tuple, row_q, col_q, total_q, fixed_point, k: AdamWScalars, rows: int, cols: int,
                        bits: int) -> None:
    """``row``, ``col``, ``mean`` <- ``b2 * old + (1 - b2) * mean of g*g`` from the exact integer sums."""
    row, col, mean = v
    n = col_q.shape[0]
    scale_up = fixed_point[1].reshape(-1, 1)
    one = torch.ones((), dtype=torch.float32)

    def mean_of(q, count: float, up):
        return (((q.to(torch.float32) * 2.0**-bits) / (one * np.float32(count))) * up) * up

    row_mean = mean_of(row_q.reshape(n, row.shape[-1]), cols, scale_up).reshape(row.shape)  # n = 0: no experts
    col_mean = mean_of(col_q, rows, scale_up)
    total_mean = mean_of(total_q, rows * cols, fixed_point[1])
    for state, new in ((row, row_mean), (col, col_mean), (mean, total_mean)):
        state.copy_(k.beta2 * state + k.one_minus_beta2 * new.reshape(state.shape))


# ------------------------------------------------------------------ driving a step over pieces
class Layout(NamedTuple):
    rows: int
    cols: int
    matrix_rows: int  # rows of one matrix (the last two dimensions); every piece stays inside one or holds whole ones
    matrices: int  # prod(shape[:-2]): 1 for a 2-D tensor, also when it has no rows (an empty shard)


def layout(shape) -> Layout:
    shape = tuple(shape)
    if len(shape) >= 2:
        matrices = 1
        for n in shape[:-2]:
            matrices *= n
        return Layout(matrices * shape[-2], shape[-1], shape[-2], matrices)
    n = shape[0] if shape else 1
    if n > STATE_BLOCK and n % STATE_BLOCK == 0:  # rows of one state block each: pieces keep blocks whole
        return Layout(n // STATE_BLOCK, STATE_BLOCK, n // STATE_BLOCK, 1)
    return Layout(1, n, 1, 1)


def pieces(lay: Layout) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)``: whole matrices when one fits in ``PIECE_ELEMENTS``, else rows inside one matrix."""
    if lay.rows == 0:
        return []
    per_piece = max(1, PIECE_ELEMENTS // max(lay.cols, 1))
    if lay.matrix_rows <= per_piece:
        step = (per_piece // lay.matrix_rows) * lay.matrix_rows
        return [(r, min(r + step, lay.rows)) for r in range(0, lay.rows, step)]
    return [(m + r, m + min(r + per_piece, lay.matrix_rows))
            for m in range(0, lay.rows, lay.matrix_rows) for r in range(0, lay.matrix_rows, per_piece)]


def _rows_view(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.view(rows, t.numel() // rows if rows else 0)


def _moment_piece(mo: Moment, lay: Layout, r0: int, r1: int, m0: int, m1: int) -> tuple:
    if isinstance(mo.fmt, Factored):
        row, col, mean = mo.tensors
        n_mats = lay.matrices
        return row.view(lay.rows)[r0:r1], col.view(n_mats, lay.cols)[m0:m1], mean.view(n_mats)[m0:m1]
    return tuple(_rows_view(t, lay.rows)[r0:r1] for t in mo.tensors)


def _resolve_seed(seed: int | None) -> int:
    if seed is None:  # follow torch's global generator
        seed = int(torch.randint(0, rng.SEED_LIMIT, ()).item())
    return seed


class Runner(NamedTuple):
    """How pieces are computed: the eager functions here, or ``eco.compiled``'s compiled ones."""

    piece: Callable  # (name, cfg) -> fn(*args)
    absmax: Callable  # (name, cfg) -> fn(*args)


EAGER = Runner(lambda name, cfg: lambda *a: PIECE_FUNCTIONS[name](*a, cfg=cfg),
               lambda name, cfg: lambda *a: ABSMAX_FUNCTIONS[name](*a, cfg=cfg))


@torch.no_grad()
def step_(name: str, weight: torch.Tensor, scales: torch.Tensor | None, grad: torch.Tensor, m: Moment,
          v: Moment | None, master: torch.Tensor | None, scalars, *, fmt: QuantFormat | None, shape,
          rounding: str = "nearest", seed: int | None = None, update_weight: bool = True, offset: int = 0,
          reduce: Reduce | None = None, full_shape=None, runner: Runner = EAGER) -> None:
    """One step of one parameter (``name``: "adamw", "sgd", "plain_adamw" or "plain_sgd"), piece by piece.

    ``weight`` is the codes of a quantized weight (``fmt`` given) or the
    parameter itself. ``offset``: global flat index of this tensor's first
    element (a dim-0 shard of a larger tensor; ``full_shape`` is then that
    tensor's shape). ``reduce`` all-reduces across the shards what a 2-D
    matrix split across them needs: the tensor-wise absmax, max |g| and the
    factored-v column and total sums, in that order, on every shard (an empty
    one too); shards of stacked matrices (experts) hold whole matrices and
    reduce nothing.
    """
    shape = torch.Size(shape)
    if len(shape) != 2:
        reduce = None  # a dim-0 shard of a stack of matrices (experts) holds whole matrices
    lay = layout(shape)
    full_rows = layout(full_shape or shape).matrix_rows
    n_mats = lay.matrices
    quantized = fmt is not None
    factored = v is not None and isinstance(v.fmt, Factored)
    injects = quantized and master is None and scalars.inject != 0.0
    stochastic_weight = quantized and update_weight and rounding == "stochastic"
    needs_seed = stochastic_weight or m.fmt.stochastic or (v is not None and v.fmt.stochastic)
    seeds = rng.stream_seeds(_resolve_seed(seed)) if needs_seed else None
    piece_list = pieces(lay)
    split_matrix = reduce is not None or (bool(piece_list) and piece_list[0][1] - piece_list[0][0] < lay.matrix_rows)
    two_pass = quantized and update_weight and fmt.tensorwise and split_matrix
    bits = fixed_point_bits(full_rows, lay.cols) if factored else 0
    base_cfg = PieceConfig(fmt=fmt, m_fmt=m.fmt, v_fmt=v.fmt if v is not None else None, rounding=rounding,
                           update_weight=update_weight, injects=injects,
                           decays=getattr(scalars, "weight_decay", 0.0) != 0.0, mats=0, absmax_given=two_pass,
                           fixed_point_bits=bits)
    k = coefficients(scalars)
    grad_rows = grad.reshape(lay.rows, lay.cols)
    weight_rows = _rows_view(weight, lay.rows)
    master_rows = _rows_view(master, lay.rows) if master is not None else None
    scale_rows = None
    if quantized:
        scale_rows = scales.view(n_mats, 1) if fmt.tensorwise else _rows_view(scales, lay.rows)

    def views(r0, r1):
        m0, m1 = r0 // lay.matrix_rows, max(r1 // lay.matrix_rows, r0 // lay.matrix_rows + 1)
        whole = (r1 - r0) % lay.matrix_rows == 0 and r0 % lay.matrix_rows == 0
        cfg = base_cfg._replace(mats=(r1 - r0) // lay.matrix_rows if whole else 0)
        s = None
        if quantized:
            s = scale_rows[m0:m1] if fmt.tensorwise else scale_rows[r0:r1]
        return (cfg, m0, m1, weight_rows[r0:r1], s, grad_rows[r0:r1], _moment_piece(m, lay, r0, r1, m0, m1),
                _moment_piece(v, lay, r0, r1, m0, m1) if v is not None else None,
                master_rows[r0:r1] if master_rows is not None else None)

    fixed_point = None
    if factored:  # max |g| per matrix: the exponent of the fixed-point sums
        amax = torch.zeros(n_mats, dtype=torch.float32, device=grad.device)
        for r0, r1 in piece_list:
            m0 = r0 // lay.matrix_rows
            piece = grad_rows[r0:r1].reshape(-1, min(r1 - r0, lay.matrix_rows) * lay.cols)
            amax[m0:m0 + piece.shape[0]] = torch.maximum(amax[m0:m0 + piece.shape[0]],
                                                         piece.abs().amax(dim=1).float())
        if reduce is not None:
            reduce(amax, "max")
        fixed_point = fixed_point_scales(amax)

    absmax = old_scales = None
    if two_pass:
        absmax = torch.zeros(n_mats, 1, dtype=torch.float32, device=grad.device)
        for r0, r1 in piece_list:
            cfg, m0, m1, w, s, g, mp, vp, wm = views(r0, r1)
            fn = runner.absmax(name, cfg)
            absmax[m0:m1] = torch.maximum(absmax[m0:m1], fn(w, s, g, mp, vp, wm, k))
        if reduce is not None:
            reduce(absmax, "max")
        old_scales = scale_rows.clone()

    row_q = torch.zeros(lay.rows, dtype=torch.int64, device=grad.device) if factored else None
    col_q = torch.zeros(n_mats, lay.cols, dtype=torch.int64, device=grad.device) if factored else None
    for r0, r1 in piece_list:
        cfg, m0, m1, w, s, g, mp, vp, wm = views(r0, r1)
        start = offset + r0 * lay.cols
        keys = tuple(rng.key(sd, start) if sd is not None and use else None
                     for sd, use in zip(seeds or (None,) * 3,
                                        (stochastic_weight, m.fmt.stochastic, v is not None and v.fmt.stochastic),
                                        strict=True))
        s_old = old_scales[m0:m1] if two_pass else s
        a = absmax[m0:m1] if two_pass else None
        fp = tuple(x[m0:m1] for x in fixed_point) if factored else None
        sums = runner.piece(name, cfg)(w, s_old, s, g, mp, vp, wm, k, keys, a, fp)
        if factored:
            row_q[r0:r1] = sums[0]
            col_q[m0:m1] += sums[1]
    if two_pass:  # what every piece wrote; also a shard with no rows holds its matrix's scale
        scale_rows.copy_(fmt.scale_pair(absmax)[0])
    if factored:
        total_q = row_q.view(n_mats, lay.matrix_rows).sum(dim=1)  # n_mats may be 0 (a shard of no experts)
        if reduce is not None:
            reduce(col_q, "sum")
            reduce(total_q, "sum")
        _finalize_factored_(v.tensors, row_q, col_q, total_q, fixed_point, k, full_rows, lay.cols, bits)


# ------------------------------------------------------------------ the backend functions the optimizer calls
@torch.no_grad()
def adamw_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq, master: torch.Tensor | None,
    *, fmt: QuantFormat, shape: torch.Size, scalars: AdamWScalars, rounding: str, seed: int | None,
    update_weight: bool = True, offset: int = 0, reduce: Reduce | None = None, full_shape=None,
    runner: Runner = EAGER,
) -> None:
    """One ECO-AdamW step for one quantized weight, in place.

    ``exp_avg``/``exp_avg_sq`` are fp32/bf16 tensors or :class:`Moment`s.
    ``update_weight=False`` (used when ``lr == 0``) updates the moments only:
    nothing moves, nothing is re-quantized, nothing is injected.
    """
    step_("adamw", codes, scales, grad, as_moment(exp_avg), as_moment(exp_avg_sq), master, scalars, fmt=fmt,
          shape=shape, rounding=rounding, seed=seed, update_weight=update_weight, offset=offset, reduce=reduce,
          full_shape=full_shape, runner=runner)


@torch.no_grad()
def sgd_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, momentum_buf, master: torch.Tensor | None, *,
    fmt: QuantFormat, shape: torch.Size, scalars: SGDScalars, rounding: str, seed: int | None,
    update_weight: bool = True, offset: int = 0, reduce: Reduce | None = None, full_shape=None,
    runner: Runner = EAGER,
) -> None:
    """One ECO-SGDM step for one quantized weight, in place (eco-method.md eqs. 2-6; see :func:`sgd_piece_`)."""
    step_("sgd", codes, scales, grad, as_moment(momentum_buf), None, master, scalars, fmt=fmt, shape=shape,
          rounding=rounding, seed=seed, update_weight=update_weight, offset=offset, reduce=reduce,
          full_shape=full_shape, runner=runner)


@torch.no_grad()
def plain_adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq, *, scalars: AdamWScalars,
                      seed: int | None = None, offset: int = 0, reduce: Reduce | None = None, full_shape=None,
                      runner: Runner = EAGER) -> None:
    """Ordinary AdamW (decoupled weight decay) for an unquantized parameter, in place."""
    step_("plain_adamw", param, None, grad.reshape(param.shape), as_moment(exp_avg), as_moment(exp_avg_sq), None,
          scalars, fmt=None, shape=param.shape, seed=seed, offset=offset, reduce=reduce, full_shape=full_shape,
          runner=runner)


@torch.no_grad()
def plain_sgd_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buf, *, scalars: SGDScalars,
                    seed: int | None = None, offset: int = 0, reduce: Reduce | None = None, full_shape=None,
                    runner: Runner = EAGER) -> None:
    """SGD with EMA momentum (torch SGD with ``dampening=momentum``) for an unquantized parameter."""
    step_("plain_sgd", param, None, grad.reshape(param.shape), as_moment(momentum_buf), None, None, scalars,
          fmt=None, shape=param.shape, seed=seed, offset=offset, reduce=reduce, full_shape=full_shape, runner=runner)


def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars: AdamWScalars, seeds=None, offsets=None,
                       full_shapes=None, reduces=None) -> None:
    """:func:`plain_adamw_step_` for each tensor (the kernels launch many small tensors at once).

    ``offsets``, ``full_shapes``, ``reduces`` (lists, or None for whole tensors): per tensor, as the single
    step's ``offset``, ``full_shape``, ``reduce`` (dim-0 shards, FSDP2). Likewise in the other batched steps.
    """
    plain_adamw_steps_with(EAGER, params, grads, exp_avgs, exp_avg_sqs, scalars=scalars, seeds=seeds,
                           offsets=offsets, full_shapes=full_shapes, reduces=reduces)


def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars: SGDScalars, seeds=None, offsets=None,
                     full_shapes=None, reduces=None) -> None:
    """:func:`plain_sgd_step_` for each tensor."""
    plain_sgd_steps_with(EAGER, params, grads, momentum_bufs, scalars=scalars, seeds=seeds, offsets=offsets,
                         full_shapes=full_shapes, reduces=reduces)


def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt: QuantFormat, shapes,
                 scalars: AdamWScalars, rounding: str, seeds, update_weight: bool = True, offsets=None,
                 full_shapes=None, reduces=None) -> None:
    """:func:`adamw_step_` for each weight (one format; per-weight shapes, seeds, masters that may be None)."""
    adamw_steps_with(EAGER, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, fmt=fmt, shapes=shapes,
                     scalars=scalars, rounding=rounding, seeds=seeds, update_weight=update_weight, offsets=offsets,
                     full_shapes=full_shapes, reduces=reduces)


def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt: QuantFormat, shapes, scalars: SGDScalars,
               rounding: str, seeds, update_weight: bool = True, offsets=None, full_shapes=None,
               reduces=None) -> None:
    """:func:`sgd_step_` for each weight."""
    sgd_steps_with(EAGER, codes, scales, grads, momentum_bufs, masters, fmt=fmt, shapes=shapes, scalars=scalars,
                   rounding=rounding, seeds=seeds, update_weight=update_weight, offsets=offsets,
                   full_shapes=full_shapes, reduces=reduces)


def shard_arguments(n: int, offsets=None, full_shapes=None, reduces=None) -> list[dict]:
    """The ``offset``/``full_shape``/``reduce`` of each of ``n`` tensors of a batched step (defaults: whole)."""
    return [dict(offset=o, full_shape=f, reduce=r)
            for o, f, r in zip(offsets or [0] * n, full_shapes or [None] * n, reduces or [None] * n, strict=True)]


def plain_adamw_steps_with(runner: Runner, params, grads, exp_avgs, exp_avg_sqs, *, scalars, seeds=None,
                           offsets=None, full_shapes=None, reduces=None) -> None:
    """:func:`plain_adamw_steps_` computing its pieces with ``runner`` (``eco.compiled`` passes its own)."""
    where = shard_arguments(len(params), offsets, full_shapes, reduces)
    for p, g, m, v, seed, at in zip(params, grads, exp_avgs, exp_avg_sqs, seeds or [None] * len(params), where,
                                    strict=True):
        plain_adamw_step_(p, g, m, v, scalars=scalars, seed=seed, runner=runner, **at)


def plain_sgd_steps_with(runner: Runner, params, grads, momentum_bufs, *, scalars, seeds=None, offsets=None,
                         full_shapes=None, reduces=None) -> None:
    where = shard_arguments(len(params), offsets, full_shapes, reduces)
    for p, g, m, seed, at in zip(params, grads, momentum_bufs, seeds or [None] * len(params), where, strict=True):
        plain_sgd_step_(p, g, m, scalars=scalars, seed=seed, runner=runner, **at)


def adamw_steps_with(runner: Runner, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt, shapes, scalars,
                     rounding, seeds, update_weight=True, offsets=None, full_shapes=None, reduces=None) -> None:
    where = shard_arguments(len(codes), offsets, full_shapes, reduces)
    for c, s, g, m, v, w, shape, seed, at in zip(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, shapes, seeds,
                                                 where, strict=True):
        adamw_step_(c, s, g, m, v, w, fmt=fmt, shape=shape, scalars=scalars, rounding=rounding, seed=seed,
                    update_weight=update_weight, runner=runner, **at)


def sgd_steps_with(runner: Runner, codes, scales, grads, momentum_bufs, masters, *, fmt, shapes, scalars, rounding,
                   seeds, update_weight=True, offsets=None, full_shapes=None, reduces=None) -> None:
    where = shard_arguments(len(codes), offsets, full_shapes, reduces)
    for c, s, g, m, w, shape, seed, at in zip(codes, scales, grads, momentum_bufs, masters, shapes, seeds, where,
                                              strict=True):
        sgd_step_(c, s, g, m, w, fmt=fmt, shape=shape, scalars=scalars, rounding=rounding, seed=seed,
                  update_weight=update_weight, runner=runner, **at)


def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`QuantFormat.quantize` with the backends' signature; stochastic rounding from the weight stream of
    ``seed`` (None: a seed from torch's global generator), as a step rounds."""
    if rounding != "stochastic":
        return fmt.quantize(x, rounding)
    key = rng.key(_resolve_seed(seed))
    return fmt.quantize(x, rounding, uniform=lambda y: rng.uniform(key, y.shape, y.device))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:meth:`QuantFormat.dequantize` with the backends' signature, piece by piece (the step's pieces).

    Decoding works in fp32 and int32 (several times the output's bytes); on a
    whole fused expert tensor, a layer of a MoE model, those temporaries would
    dominate the peak memory of forward and backward. Pieces hold whole scale
    groups, so the values are the same bits. Under ``torch.compile`` the
    compiler plans the memory of one expression instead.
    """
    shape = torch.Size(shape)
    lay = layout(shape)
    piece_list = pieces(lay)
    if (len(shape) < 2 or len(piece_list) <= 1 or torch.compiler.is_compiling()
            or not (codes.is_contiguous() and scales.is_contiguous())):
        return fmt.dequantize(codes, scales, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    out_rows = out.view(lay.rows, lay.cols)
    code_rows = _rows_view(codes, lay.rows)
    scale_rows = scales.view(lay.matrices, -1) if fmt.tensorwise else _rows_view(scales, lay.rows)
    for r0, r1 in piece_list:
        if fmt.tensorwise:  # a piece is whole matrices or rows inside one: one scale per matrix it touches
            m0 = r0 // lay.matrix_rows
            m1 = max(r1 // lay.matrix_rows, m0 + 1)
            piece_shape = (m1 - m0, lay.matrix_rows, lay.cols) if (r1 - r0) % lay.matrix_rows == 0 and \
                r0 % lay.matrix_rows == 0 else (r1 - r0, lay.cols)
            piece_scales = scale_rows[m0:m1]
        else:
            piece_shape, piece_scales = (r1 - r0, lay.cols), scale_rows[r0:r1]
        out_rows[r0:r1] = fmt.dequantize(code_rows[r0:r1], piece_scales, piece_shape, dtype).view(r1 - r0, lay.cols)
    return out
