"""The CPU fast path: the reference step compiled by ``torch.compile`` into one fused loop per piece.

The eager reference runs a piece of a step as some twenty separate torch ops,
each reading and writing piece-sized temporaries. This module hands the very
same piece functions (``eco.reference.*_piece_``) to inductor, which fuses
them into one C++ loop. Same code, same numbers: inductor's fp32 division and
square root are correctly rounded and it compiles without FMA contraction, so
codes, scales and states are bit-identical to the eager reference
(tests/test_compiled.py checks every weight format, rounding, optimizer and
state format).

Randomness: stochastic rounding draws from the counter-based stream of
:mod:`eco.rng`, which inductor fuses into the same loop; the eager reference
draws the same numbers, so stochastic steps are bit-identical too. Tensors are
stepped in pieces exactly as the eager reference steps them (one compiled loop
per piece shape), so the step's temporary memory is bounded the same way.

Cost: the first step of each combination of format, rounding, options, dtypes
and piece shape compiles (seconds each; inductor keeps the result in its
on-disk cache for later processes). Shapes are compiled static: with symbolic
shapes inductor turns the block/group reductions into slow scalar loops. So
this path is opt-in, ``backend="compiled"``; ``backend="auto"`` keeps the
eager reference on CPU.
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

_failure: str | None = None  # why compiling failed here; once set, every step runs the eager reference


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
#: a bool tensor that inductor stores one byte at a time (several times slower; bench/step_speed.py).
_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 100}


def _compile(fn):
    known = {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(torch._inductor.config, k)}
    return torch.compile(fn, dynamic=False, fullgraph=True, options=known)


@functools.cache
def _compiled(kind: str, name: str, cfg: reference.PieceConfig):
    table = reference.PIECE_FUNCTIONS if kind == "piece" else reference.ABSMAX_FUNCTIONS
    return _compile(functools.partial(table[name], cfg=cfg))


def _with_fallback(kind: str, name: str, cfg: reference.PieceConfig):
    """The compiled piece function; if compiling fails, remember why, warn once and run the eager one from then on.

    Compilation happens before the compiled code touches any tensor, and both
    give the same bits, so a failure in the middle of a step changes nothing.
    """
    table = reference.PIECE_FUNCTIONS if kind == "piece" else reference.ABSMAX_FUNCTIONS

    def call(*args):
        global _failure
        if _failure is None:
            try:
                return _compiled(kind, name, cfg)(*args)
            except Exception as exc:  # inductor raises many types (BackendCompilerFailed, CppCompileError, ...)
                _failure = f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc)[:300]})"
                warnings.warn(f"eco: {_failure}; using the eager reference path instead", RuntimeWarning,
                              stacklevel=2)
        return table[name](*args, cfg=cfg)
    return call


RUNNER = reference.Runner(functools.partial(_with_fallback, "piece"), functools.partial(_with_fallback, "absmax"))


def _dynamo_settings() -> dict:
    """Room for one compiled graph per combination a process uses, and an error instead of a silent
    eager fallback past that room (dynamo counts the graphs of all our piece functions together)."""
    wanted = {"recompile_limit": 256, "fail_on_recompile_limit_hit": True}
    return {k: v for k, v in wanted.items() if hasattr(torch._dynamo.config, k)}


def _run(fn, *args, **kwargs) -> None:
    """``fn`` (an ``eco.reference`` step function) with the compiled runner; one dynamo settings patch for the
    whole call (entering it costs more than the compiled step of a small tensor)."""
    with torch._dynamo.config.patch(**_dynamo_settings()):
        fn(*args, **kwargs)


@torch.no_grad()
def adamw_step_(codes, scales, grad, exp_avg, exp_avg_sq, master, **kwargs) -> None:
    """:func:`eco.reference.adamw_step_`, compiled."""
    _run(reference.adamw_step_, codes, scales, grad, exp_avg, exp_avg_sq, master, runner=RUNNER, **kwargs)


@torch.no_grad()
def sgd_step_(codes, scales, grad, momentum_buf, master, **kwargs) -> None:
    """:func:`eco.reference.sgd_step_`, compiled."""
    _run(reference.sgd_step_, codes, scales, grad, momentum_buf, master, runner=RUNNER, **kwargs)


@torch.no_grad()
def plain_adamw_step_(param, grad, exp_avg, exp_avg_sq, **kwargs) -> None:
    """:func:`eco.reference.plain_adamw_step_`, compiled."""
    _run(reference.plain_adamw_step_, param, grad, exp_avg, exp_avg_sq, runner=RUNNER, **kwargs)


@torch.no_grad()
def plain_sgd_step_(param, grad, momentum_buf, **kwargs) -> None:
    """:func:`eco.reference.plain_sgd_step_`, compiled."""
    _run(reference.plain_sgd_step_, param, grad, momentum_buf, runner=RUNNER, **kwargs)


@torch.no_grad()
def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt, shapes, scalars, rounding, seeds,
                 update_weight=True, offsets=None, full_shapes=None, reduces=None) -> None:
    """:func:`eco.reference.adamw_steps_`, compiled."""
    _run(reference.adamw_steps_with, RUNNER, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, fmt=fmt,
         shapes=shapes, scalars=scalars, rounding=rounding, seeds=seeds, update_weight=update_weight,
         offsets=offsets, full_shapes=full_shapes, reduces=reduces)


@torch.no_grad()
def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt, shapes, scalars, rounding, seeds,
               update_weight=True, offsets=None, full_shapes=None, reduces=None) -> None:
    """:func:`eco.reference.sgd_steps_`, compiled."""
    _run(reference.sgd_steps_with, RUNNER, codes, scales, grads, momentum_bufs, masters, fmt=fmt, shapes=shapes,
         scalars=scalars, rounding=rounding, seeds=seeds, update_weight=update_weight, offsets=offsets,
         full_shapes=full_shapes, reduces=reduces)


@torch.no_grad()
def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars, seeds=None, offsets=None, full_shapes=None,
                       reduces=None) -> None:
    """:func:`eco.reference.plain_adamw_steps_`, compiled."""
    _run(reference.plain_adamw_steps_with, RUNNER, params, grads, exp_avgs, exp_avg_sqs, scalars=scalars, seeds=seeds,
         offsets=offsets, full_shapes=full_shapes, reduces=reduces)


@torch.no_grad()
def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars, seeds=None, offsets=None, full_shapes=None,
                     reduces=None) -> None:
    """:func:`eco.reference.plain_sgd_steps_`, compiled."""
    _run(reference.plain_sgd_steps_with, RUNNER, params, grads, momentum_bufs, scalars=scalars, seeds=seeds,
         offsets=offsets, full_shapes=full_shapes, reduces=reduces)


#: quantize/dequantize outside a step (a model's forward, ``quantize_``) run the eager reference
quantize = reference.quantize
dequantize = reference.dequantize
