"""The CPU fast path: the reference update compiled by ``torch.compile`` into one fused loop.

The eager reference runs a step as some twenty separate torch ops, each
reading and writing full-size temporaries. This module hands the very same
functions (``eco.reference.*_update_``) to inductor, which fuses them into one
C++ loop per tensor. Same code, same numbers: inductor's fp32 division and
square root are correctly rounded and it compiles without FMA contraction, so
codes, scales and moments are bit-identical to the eager reference with the
same random numbers (tests/test_compiled.py checks every format, rounding,
optimizer and state dtype).

Randomness: stochastic rounding draws from :func:`counter_uniform`, a hash of
(seed, element index) that inductor fuses into the same loop (``torch.rand``
would be a separate pass over memory with its own generator). The eager reference draws from
``torch.rand``, so under stochastic rounding the two paths give different (both
unbiased) draws; under round-to-nearest nothing random is used.

Cost: the first step of each combination of format, rounding, options, dtypes
and shape compiles (inductor keeps the result in its on-disk cache for later
processes). Shapes are compiled static: with symbolic shapes inductor turns the
block/group reductions into slow scalar loops. So this path is opt-in,
``backend="compiled"``; ``backend="auto"`` keeps the eager reference on CPU.
Without a C++ compiler on PATH, ``backend="compiled"`` is refused with an
error that says so; where compiling fails anyway (an unsupported platform, too
many recompilations) it warns once and runs the eager reference from then on.
"""

from __future__ import annotations

import functools
import shutil
import warnings

import torch
import torch._inductor.config

from . import reference

# lowbias32 (C. Wellons' 32-bit integer hash), computed in int32: products wrap mod 2**32 and a logical
# shift right is an arithmetic one with the sign-extended bits masked off. Both multipliers as int32.
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B - (1 << 32)
_INT32_SIGN = 1 << 31
_INT32_INDEX_LIMIT = 1 << 31  # tensors this large count in int64 first

_failure: str | None = None  # why compiling failed here; once set, every step runs the eager reference


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >>> bits`` on the 32 bits of an int32 tensor."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _low_word(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor, as the int32 with those bits."""
    return (((x & 0xFFFFFFFF) ^ _INT32_SIGN) - _INT32_SIGN).to(torch.int32)


def _element_index(numel: int, device) -> torch.Tensor:
    """0, 1, ..., numel - 1 as int32, wrapping at 2**32 (the counter of :func:`counter_uniform`)."""
    if numel < _INT32_INDEX_LIMIT:
        return torch.arange(numel, device=device, dtype=torch.int32)
    return _low_word(torch.arange(numel, device=device, dtype=torch.int64))


def counter_uniform(seed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1) shaped like ``y``: 24 bits of a hash of (``seed``, element index).

    ``seed`` is a 0-d int64 tensor in [0, 2**62) (a tensor, so a new seed each step
    is an input, not a recompile). Counter-based: the value of element ``i`` depends on ``i``
    and the seed only, in eager and compiled code alike. Indices wrap at 2**32. The hash runs
    on int32: inductor vectorizes int32 arithmetic, not int64.
    """
    index = _element_index(y.numel(), y.device).reshape(y.shape)
    # The seed picks a stride (odd, < 2**30) and an offset (its low 32 bits), so two seeds
    # walk different sequences.
    stride = ((seed >> 32) | 1).to(torch.int32)
    offset = _low_word(seed)
    x = index * stride + offset
    x = x ^ _shift_right_logical(x, 16)
    x = x * _HASH_MUL1
    x = x ^ _shift_right_logical(x, 15)
    x = x * _HASH_MUL2
    x = x ^ _shift_right_logical(x, 16)
    return _shift_right_logical(x, 8).to(torch.float32) * (1.0 / 16777216.0)


@functools.cache
def _cxx_compiler() -> str | None:
    """The C++ compiler inductor will find on PATH, looked up once (dispatch asks for every tensor, every step)."""
    return next((cc for cc in ("c++", "g++", "clang++") if shutil.which(cc)), None)


def unavailable_reason() -> str | None:
    """Why this path cannot run here, or None when it can (as far as can be told without compiling)."""
    if _cxx_compiler() is None:
        return "torch.compile on CPU needs a C++ compiler (c++, g++ or clang++ on PATH)"
    return None


def compile_failure() -> str | None:
    """Why compiling failed in this process (every step since has run the eager reference), or None."""
    return _failure


def supports(param: torch.Tensor) -> bool:
    """Whether ``param`` can be stepped here: a CPU tensor, and a C++ compiler for inductor."""
    return param.device.type == "cpu" and unavailable_reason() is None


#: Inductor cuts a fused expression into a stored intermediate once it exceeds this many ops
#: (50 by default on CPU). 50 cuts our stochastic-rounding chain at the up/down decision,
#: a bool tensor that inductor stores one byte at a time, which made block/group SR steps
#: several times slower (figures: docs/notes-from-code.md).
_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 100}


def _compile(fn):
    known = {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(torch._inductor.config, k)}
    return torch.compile(fn, dynamic=False, fullgraph=True, options=known)


def _seed_tensor(seed: int | None) -> torch.Tensor:
    if seed is None:  # as the reference: follow torch's global generator
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.tensor(seed, dtype=torch.int64)


#: quantize/dequantize outside a step (a model's forward, ``quantize_``) run the eager reference
quantize = reference.quantize
dequantize = reference.dequantize


@functools.cache
def _adamw(fmt, rounding: str, update_weight: bool, injects: bool):
    def step(codes, scales, grad, exp_avg, exp_avg_sq, master, k, seed):
        reference.adamw_update_(
            codes, scales, grad, exp_avg, exp_avg_sq, master, k, fmt=fmt, shape=exp_avg.shape, rounding=rounding,
            uniform=functools.partial(counter_uniform, seed), update_weight=update_weight, injects=injects,
        )
    return _compile(step)


@functools.cache
def _sgd(fmt, rounding: str, update_weight: bool, injects: bool, decays: bool):
    def step(codes, scales, grad, momentum_buf, master, k, seed):
        reference.sgd_update_(
            codes, scales, grad, momentum_buf, master, k, fmt=fmt, shape=momentum_buf.shape, rounding=rounding,
            uniform=functools.partial(counter_uniform, seed), update_weight=update_weight, injects=injects,
            decays=decays,
        )
    return _compile(step)


@functools.cache
def _plain_adamw():
    return _compile(reference.plain_adamw_update_)


@functools.cache
def _plain_sgd(decays: bool):
    return _compile(functools.partial(reference.plain_sgd_update_, decays=decays))


def _dynamo_settings() -> dict:
    """Room for one compiled graph per combination a process uses, and an error instead of a silent
    eager fallback past that room (dynamo counts the graphs of all our closures together)."""
    wanted = {"recompile_limit": 256, "fail_on_recompile_limit_hit": True}
    return {k: v for k, v in wanted.items() if hasattr(torch._dynamo.config, k)}


def _run(calls) -> None:
    """Run each ``(compiled_call, eager_call)`` pair's compiled call; if compiling fails, remember why,
    warn once and run the eager reference from then on.

    Compilation happens before the compiled code touches any tensor, so a
    failure leaves the inputs as they were. One dynamo settings patch covers
    the whole list: entering it costs more than the compiled step of a small tensor.
    """
    global _failure
    with torch._dynamo.config.patch(**_dynamo_settings()):
        for compiled_call, eager_call in calls:
            if _failure is None:
                try:
                    compiled_call()
                    continue
                except Exception as exc:  # inductor raises many types (BackendCompilerFailed, CppCompileError, ...)
                    _failure = f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc)[:300]})"
                    warnings.warn(f"eco: {_failure}; using the eager reference path instead", RuntimeWarning,
                                  stacklevel=4)
            eager_call()


@torch.no_grad()
def adamw_step_(codes, scales, grad, exp_avg, exp_avg_sq, master, *, fmt, shape, scalars, rounding, seed,
                update_weight: bool = True) -> None:
    """:func:`eco.reference.adamw_step_`, compiled (stochastic rounding from :func:`counter_uniform`)."""
    adamw_steps_([codes], [scales], [grad], [exp_avg], [exp_avg_sq], [master], fmt=fmt, shapes=[shape],
                 scalars=scalars, rounding=rounding, seeds=[seed], update_weight=update_weight)


@torch.no_grad()
def sgd_step_(codes, scales, grad, momentum_buf, master, *, fmt, shape, scalars, rounding, seed,
              update_weight: bool = True) -> None:
    """:func:`eco.reference.sgd_step_`, compiled (stochastic rounding from :func:`counter_uniform`)."""
    sgd_steps_([codes], [scales], [grad], [momentum_buf], [master], fmt=fmt, shapes=[shape], scalars=scalars,
               rounding=rounding, seeds=[seed], update_weight=update_weight)


@torch.no_grad()
def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars) -> None:
    """:func:`eco.reference.plain_adamw_steps_`, compiled (one fused loop per tensor)."""
    k, fn = reference.coefficients(scalars), _plain_adamw()
    _run([(functools.partial(fn, p, g, m, v, k),
           functools.partial(reference.plain_adamw_step_, p, g, m, v, scalars=scalars))
          for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)])


@torch.no_grad()
def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars) -> None:
    """:func:`eco.reference.plain_sgd_steps_`, compiled (one fused loop per tensor)."""
    k, fn = reference.coefficients(scalars), _plain_sgd(scalars.weight_decay != 0.0)
    _run([(functools.partial(fn, p, g, m, k), functools.partial(reference.plain_sgd_step_, p, g, m, scalars=scalars))
          for p, g, m in zip(params, grads, momentum_bufs, strict=True)])


@torch.no_grad()
def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt, shapes, scalars, rounding, seeds,
                 update_weight: bool = True) -> None:
    """:func:`eco.reference.adamw_steps_`, compiled (one fused loop per weight; coefficients made once)."""
    k = reference.coefficients(scalars)
    calls = []
    for c, s, g, m, v, w, shape, seed in zip(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, shapes, seeds,
                                             strict=True):
        fn = _adamw(fmt, rounding, update_weight, reference._injects(w, scalars))
        calls.append((functools.partial(fn, c, s, g.reshape(shape), m, v, w, k, _seed_tensor(seed)),
                      functools.partial(reference.adamw_step_, c, s, g, m, v, w, fmt=fmt, shape=shape,
                                        scalars=scalars, rounding=rounding, seed=seed, update_weight=update_weight)))
    _run(calls)


@torch.no_grad()
def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt, shapes, scalars, rounding, seeds,
               update_weight: bool = True) -> None:
    """:func:`eco.reference.sgd_steps_`, compiled (one fused loop per weight; coefficients made once)."""
    k, decays = reference.coefficients(scalars), scalars.weight_decay != 0.0
    calls = []
    for c, s, g, m, w, shape, seed in zip(codes, scales, grads, momentum_bufs, masters, shapes, seeds, strict=True):
        fn = _sgd(fmt, rounding, update_weight, reference._injects(w, scalars), decays)
        calls.append((functools.partial(fn, c, s, g.reshape(shape), m, w, k, _seed_tensor(seed)),
                      functools.partial(reference.sgd_step_, c, s, g, m, w, fmt=fmt, shape=shape, scalars=scalars,
                                        rounding=rounding, seed=seed, update_weight=update_weight)))
    _run(calls)
