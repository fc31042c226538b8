"""The ECO update in plain torch: the single source of truth.

Every function here is a pure function of tensors and host scalars that
updates its tensors in place, exactly as a fused kernel does. The Triton
kernels in ``eco.kernels`` have the same signatures and are tested against
these (codes bit-identical under round-to-nearest).

Arithmetic is fp32 with every host scalar rounded to fp32 once (the
``*Scalars`` tuples below). Each line is one rounding, in the order written,
with no fused multiply-add: a kernel that wants bit-identical codes must
evaluate the same expressions in the same order.

ECO-AdamW for a quantized weight ``w`` (docs/method.md, Algorithm 3)::

    m~  = b1 * m + (1 - b1) * g
    v'  = b2 * v + (1 - b2) * (g * g)
    d   = sqrt(v' * inv_bc2) + eps                    # inv_bc2 = 1 / (1 - b2**t)
    w~  = deq(w) * decay - step_size * (m~ / d)       # decay = 1 - lr*wd, step_size = lr / bc1
    w'  = q(w~)                                       # new codes and scales
    e   = w~ - deq(w')
    m'  = m~ + (inject * d) * e                       # inject = (bc1 / lr) * (1 - 1/b1)

With ``master`` (an fp32 copy) the base is ``master`` instead of ``deq(w)``,
``master`` becomes ``w~`` and nothing is injected. With
``error_feedback=False`` (naive removal) nothing is injected either.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .formats import QuantFormat, UniformSource


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


def coefficients(scalars: AdamWScalars | SGDScalars):
    """``scalars`` with every field as an fp32 0-d tensor: exactly the value a kernel receives.

    The ``*_update_`` functions take these, so that a compiled caller passes new
    values each step as inputs instead of recompiling for each one.
    """
    return type(scalars)(*(torch.tensor(x, dtype=torch.float32) for x in scalars))


def torch_uniform(seed: int | None) -> UniformSource | None:
    """Stochastic-rounding uniforms from ``torch.rand`` seeded with ``seed`` (None: the global generator)."""
    if seed is None:
        return None

    def uniform(y: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=y.device).manual_seed(seed)
        return torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)

    return uniform


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (IEEE, as CUDA and the kernels compute it).

    torch's eager CPU ``sqrt`` is not: it is one ulp off for about 20% of fp32
    values (torch 2.13, AVX2 and default builds), which would make CPU and GPU
    results differ. numpy's fp32 sqrt is exact (and no slower); so is the code
    torch.compile generates (``eco.compiled``, checked by its tests).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.asarray(np.sqrt(x.numpy())))  # np.sqrt of a 0-d array is a numpy scalar
    return torch.sqrt(x)


def _adam_moments(g, m, v, k: AdamWScalars):
    m_new = k.beta1 * m + k.one_minus_beta1 * g
    v_new = k.beta2 * v + k.one_minus_beta2 * (g * g)
    d = _sqrt_rn(v_new * k.inv_bc2) + k.eps
    return m_new, v_new, d


def _requantize(codes, scales, w_tilde, *, fmt, rounding, uniform):
    """Store ``q(w~)`` in ``codes`` and ``scales``."""
    new_codes, new_scales = fmt.quantize(w_tilde, rounding, uniform=uniform)
    codes.copy_(new_codes)
    scales.copy_(new_scales)


def _injects(master, scalars) -> bool:
    return master is None and scalars.inject != 0.0


@torch.no_grad()
def adamw_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor, master: torch.Tensor | None, *, fmt: QuantFormat, shape: torch.Size,
    scalars: AdamWScalars, rounding: str, seed: int | None, update_weight: bool = True,
) -> None:
    """One ECO-AdamW step for one quantized weight, in place.

    ``update_weight=False`` (used when ``lr == 0``) updates the moments only:
    nothing moves, nothing is re-quantized, nothing is injected.
    """
    adamw_update_(
        codes, scales, grad, exp_avg, exp_avg_sq, master, coefficients(scalars), fmt=fmt, shape=shape,
        rounding=rounding, uniform=torch_uniform(seed), update_weight=update_weight, injects=_injects(master, scalars),
    )


def adamw_update_(codes, scales, grad, exp_avg, exp_avg_sq, master, k: AdamWScalars, *, fmt, shape, rounding,
                  uniform: UniformSource | None, update_weight: bool, injects: bool) -> None:
    """:func:`adamw_step_` with its coefficients as tensors (:func:`coefficients`) and every choice made."""
    g = grad.float().reshape(shape)
    m_tilde, v_new, d = _adam_moments(g, exp_avg.float(), exp_avg_sq.float(), k)
    m_new = m_tilde
    if update_weight:
        base = master if master is not None else fmt.dequantize(codes, scales, shape)
        w_tilde = base * k.decay - k.step_size * (m_tilde / d)
        if master is not None:
            master.copy_(w_tilde)
        _requantize(codes, scales, w_tilde, fmt=fmt, rounding=rounding, uniform=uniform)
        if injects:
            m_new = m_tilde + (k.inject * d) * (w_tilde - fmt.dequantize(codes, scales, shape))
    exp_avg.copy_(m_new)
    exp_avg_sq.copy_(v_new)


@torch.no_grad()
def sgd_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor,
    master: torch.Tensor | None, *, fmt: QuantFormat, shape: torch.Size, scalars: SGDScalars,
    rounding: str, seed: int | None, update_weight: bool = True,
) -> None:
    """One ECO-SGDM step for one quantized weight, in place (docs/method.md, eqs. 2-6).

    ``m~ = beta*m + (1-beta)*(g + wd*w)``, ``w~ = w - lr*m~``, ``w' = q(w~)``,
    ``m' = m~ + alpha*(w~ - deq(w'))`` with ``alpha = (1/lr)(1 - 1/beta)``.
    """
    sgd_update_(
        codes, scales, grad, momentum_buf, master, coefficients(scalars), fmt=fmt, shape=shape, rounding=rounding,
        uniform=torch_uniform(seed), update_weight=update_weight, injects=_injects(master, scalars),
        decays=scalars.weight_decay != 0.0,
    )


def sgd_update_(codes, scales, grad, momentum_buf, master, k: SGDScalars, *, fmt, shape, rounding,
                uniform: UniformSource | None, update_weight: bool, injects: bool, decays: bool) -> None:
    """:func:`sgd_step_` with its coefficients as tensors (:func:`coefficients`) and every choice made."""
    base = master if master is not None else fmt.dequantize(codes, scales, shape)
    m_tilde = _sgd_momentum(grad.float().reshape(shape), momentum_buf.float(), base, k, decays)
    m_new = m_tilde
    if update_weight:
        w_tilde = base - k.lr * m_tilde
        if master is not None:
            master.copy_(w_tilde)
        _requantize(codes, scales, w_tilde, fmt=fmt, rounding=rounding, uniform=uniform)
        if injects:
            m_new = m_tilde + k.inject * (w_tilde - fmt.dequantize(codes, scales, shape))
    momentum_buf.copy_(m_new)


def _sgd_momentum(g, m, w, k: SGDScalars, decays: bool):
    """``beta*m + (1-beta)*(g + wd*w)``; the weight-decay term only when ``decays``."""
    if decays:
        g = g + k.weight_decay * w
    return k.beta * m + k.one_minus_beta * g


@torch.no_grad()
def plain_adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      *, scalars: AdamWScalars) -> None:
    """Ordinary AdamW (decoupled weight decay) for an unquantized parameter, in place."""
    plain_adamw_update_(param, grad, exp_avg, exp_avg_sq, coefficients(scalars))


def plain_adamw_update_(param, grad, exp_avg, exp_avg_sq, k: AdamWScalars) -> None:
    m_new, v_new, d = _adam_moments(grad.float(), exp_avg.float(), exp_avg_sq.float(), k)
    param.copy_(param.float() * k.decay - k.step_size * (m_new / d))
    exp_avg.copy_(m_new)
    exp_avg_sq.copy_(v_new)


@torch.no_grad()
def plain_sgd_step_(
    param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, scalars: SGDScalars
) -> None:
    """SGD with EMA momentum (torch SGD with ``dampening=momentum``) for an unquantized parameter."""
    plain_sgd_update_(param, grad, momentum_buf, coefficients(scalars), decays=scalars.weight_decay != 0.0)


def plain_sgd_update_(param, grad, momentum_buf, k: SGDScalars, *, decays: bool) -> None:
    m_new = _sgd_momentum(grad.float(), momentum_buf.float(), param.float(), k, decays)
    param.copy_(param.float() - k.lr * m_new)
    momentum_buf.copy_(m_new)


def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars: AdamWScalars) -> None:
    """:func:`plain_adamw_step_` for each tensor (the kernels launch many small tensors at once)."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        plain_adamw_step_(p, g, m, v, scalars=scalars)


def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars: SGDScalars) -> None:
    """:func:`plain_sgd_step_` for each tensor."""
    for p, g, m in zip(params, grads, momentum_bufs, strict=True):
        plain_sgd_step_(p, g, m, scalars=scalars)


def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt: QuantFormat, shapes,
                 scalars: AdamWScalars, rounding: str, seeds, update_weight: bool = True) -> None:
    """:func:`adamw_step_` for each weight (one format; per-weight shapes, seeds, masters that may be None)."""
    for c, s, g, m, v, w, shape, seed in zip(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, shapes, seeds,
                                             strict=True):
        adamw_step_(c, s, g, m, v, w, fmt=fmt, shape=shape, scalars=scalars, rounding=rounding, seed=seed,
                    update_weight=update_weight)


def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt: QuantFormat, shapes, scalars: SGDScalars,
               rounding: str, seeds, update_weight: bool = True) -> None:
    """:func:`sgd_step_` for each weight."""
    for c, s, g, m, w, shape, seed in zip(codes, scales, grads, momentum_bufs, masters, shapes, seeds, strict=True):
        sgd_step_(c, s, g, m, w, fmt=fmt, shape=shape, scalars=scalars, rounding=rounding, seed=seed,
                  update_weight=update_weight)


def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`QuantFormat.quantize` with the backends' signature (stochastic uniforms from :func:`torch_uniform`)."""
    return fmt.quantize(x, rounding, uniform=torch_uniform(seed))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:meth:`QuantFormat.dequantize` with the backends' signature."""
    return fmt.dequantize(codes, scales, shape, dtype)
