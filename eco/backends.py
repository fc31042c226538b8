"""Which implementation runs: the one place that decides.

A *backend* is a module with the functions of :class:`Backend`: the batched
ECO and plain steps and the format codec (quantize/dequantize). Three
conform: ``eco.reference`` (eager torch, the definition), ``eco.compiled``
(the reference compiled by ``torch.compile``, CPU) and ``eco.kernels``
(Triton). A backend groups its inputs as it likes (the kernels put tensors of
the same dtypes into one launch); callers hand it everything of one format
and one set of scalars.

:func:`select` picks the backend of an optimizer step, :func:`select_codec`
the one that quantizes and dequantizes a :class:`~eco.QuantizedTensor`.

Choices (``backend=`` of ``eco.AdamW``/``eco.SGD``, or ``ECO_BACKEND``):

``"auto"``
    the kernels for CUDA tensors when Triton imports, else the reference.
``"reference"``
    the eager reference everywhere (quantize and dequantize included).
``"compiled"``
    CPU tensors through ``torch.compile``; an error for others.
``"triton"``
    the kernels; an error where they cannot run (CPU tensors run under
    ``TRITON_INTERPRET=1``, the tests' way to prove them without a GPU).

Precedence: the environment variable ``ECO_BACKEND``, when set, overrides
``backend=`` (an operator's switch, e.g. ``ECO_BACKEND=reference`` to rule
the kernels out of a run without editing the training script); it warns once
per pair when it overrides an explicit choice other than ``"auto"``. It is
read and validated by :func:`env_choice` only, and also steers the codec:
``"reference"`` or ``"compiled"`` keep quantize/dequantize on the format's
torch code.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Protocol

import torch

from . import compiled, reference
from .formats import QuantFormat

BACKENDS = ("auto", "reference", "compiled", "triton")


class Backend(Protocol):
    """What every backend module implements (signatures of ``eco.reference``).

    Step functions update their tensors in place; lists hold one entry per
    tensor, ``masters`` may hold None (no fp32 master copy), ``seeds`` None
    (round to nearest, or the global generator; plain steps draw stochastic
    rounding of their states from them). A state (``exp_avgs``, ...) is an
    fp32/bf16 tensor or an ``eco.reference.Moment`` (8-bit and factored
    formats). ``update_weight=False`` (a zero learning rate) updates the
    moments only. ``offsets``, ``full_shapes``, ``reduces`` (None: whole
    tensors) say, per tensor, where a dim-0 shard sits in its whole tensor and
    how to all-reduce across the shards (``eco.reference.step_``).
    """

    def adamw_steps_(self, codes: list, scales: list, grads: list, exp_avgs: list, exp_avg_sqs: list, masters: list,
                     *, fmt: QuantFormat, shapes: list, scalars: reference.AdamWScalars, rounding: str, seeds: list,
                     update_weight: bool = True, offsets: list | None = None, full_shapes: list | None = None,
                     reduces: list | None = None) -> None: ...

    def sgd_steps_(self, codes: list, scales: list, grads: list, momentum_bufs: list, masters: list, *,
                   fmt: QuantFormat, shapes: list, scalars: reference.SGDScalars, rounding: str, seeds: list,
                   update_weight: bool = True, offsets: list | None = None, full_shapes: list | None = None,
                   reduces: list | None = None) -> None: ...

    def plain_adamw_steps_(self, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, *,
                           scalars: reference.AdamWScalars, seeds: list | None = None, offsets: list | None = None,
                           full_shapes: list | None = None, reduces: list | None = None) -> None: ...

    def plain_sgd_steps_(self, params: list, grads: list, momentum_bufs: list, *,
                         scalars: reference.SGDScalars, seeds: list | None = None, offsets: list | None = None,
                         full_shapes: list | None = None, reduces: list | None = None) -> None: ...

    def quantize(self, x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def check_choice(choice: str) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    return choice


def env_choice() -> str | None:
    """``ECO_BACKEND`` validated, or None when it is unset or empty (the only reader of the variable)."""
    value = os.environ.get("ECO_BACKEND", "")
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"ECO_BACKEND={value!r} is not a backend; set it to one of {BACKENDS}, or unset it")
    return value


_WARNED: set = set()


def resolve(choice: str) -> str:
    """The choice in force: ``ECO_BACKEND`` when set, else ``choice`` (see the module docstring)."""
    check_choice(choice)
    env = env_choice()
    if env is None or env == choice:
        return choice
    if choice != "auto" and (env, choice) not in _WARNED:
        _WARNED.add((env, choice))
        warnings.warn(f"ECO_BACKEND={env} overrides backend={choice!r}", RuntimeWarning, stacklevel=3)
    return env


def _kernels() -> ModuleType:
    from . import kernels  # imported on first use: importing Triton is slow, and CPU-only users may lack it

    return kernels


def select(choice: str, tensor: torch.Tensor) -> Backend:
    """The backend that steps ``tensor`` (a parameter) for ``choice``; raises where the choice cannot run it."""
    choice = resolve(choice)
    if choice == "reference":
        return reference
    if choice == "compiled":
        if not compiled.supports(tensor):
            raise RuntimeError(
                f"backend='compiled' runs CPU tensors through torch.compile; got a {tensor.device} tensor "
                f"({compiled.unavailable_reason() or 'not a CPU tensor'}). Use backend='auto'."
            )
        return compiled
    kernels = _kernels()
    if kernels.supports(tensor, interpreted=choice == "triton"):
        return kernels
    if choice == "triton":
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor and an importable triton; got a {tensor.device} tensor "
            f"({kernels.unavailable_reason()}). Use backend='auto' to fall back to the reference path."
        )
    return reference


def select_codec(fmt: QuantFormat, dtype: torch.dtype, *tensors: torch.Tensor, rounding: str = "nearest") -> Backend:
    """The backend that quantizes ``tensors`` (of ``dtype``) into ``fmt``, or dequantizes them into ``dtype``.

    The kernels for round-to-nearest on CUDA tensors they cover (unless
    ``ECO_BACKEND`` says ``reference`` or ``compiled``), the reference
    otherwise: the same values.
    """
    if rounding == "nearest" and all(t.is_cuda for t in tensors) and resolve("auto") in ("auto", "triton"):
        kernels = _kernels()
        if kernels.codec_covers(fmt, dtype, *tensors):
            return kernels
    return reference


def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` in ``fmt`` on the selected codec (``x`` must be finite).

    Stochastic rounding draws from ``generator`` (or torch's global generator)
    in the format's torch code, the only code that takes a torch generator.
    """
    if generator is not None:
        return fmt.quantize(x, rounding, generator)  # the reference's code, drawing from the generator
    return select_codec(fmt, x.dtype, x, rounding=rounding).quantize(x, fmt, rounding)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``codes`` and ``scales`` represent, as ``dtype``, on the selected codec."""
    return select_codec(fmt, dtype, codes, scales).dequantize(codes, scales, fmt, shape, dtype)


__all__ = ["BACKENDS", "Backend", "check_choice", "env_choice", "resolve", "select", "select_codec", "quantize",
           "dequantize"]
