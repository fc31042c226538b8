"""Fused Triton kernels for the ECO step (installed as ``eco.kernels``): a backend of ``eco.backends``.

The same functions and signatures as ``eco.reference`` (the batched
``adamw_steps_``, ``sgd_steps_``, ``plain_adamw_steps_``, ``plain_sgd_steps_``,
their one-tensor forms, ``quantize`` and ``dequantize``), and bit-identical to
it under round-to-nearest. ``eco.backends.select`` sends CUDA tensors here;
under ``TRITON_INTERPRET=1`` they also run on CPU tensors with
``backend="triton"`` (slowly: how the tests prove them against the reference).

One step of a quantized weight is one pass over memory: load gradient, codes,
scales and moments; dequantize; AdamW/SGD in fp32; quantize (nearest or
stochastic); inject the error into m; store. Row-wise FP8 and tensor-wise INT4
need the new absmax of a whole row/matrix first, so they take two launches that
recompute the same values instead of writing any full-size temporary. Many
small tensors share one multi-tensor launch.

Modules: ``steps`` (these functions), ``launcher`` (availability, the checked
launch under the tensor's device guard, kernel arguments, multi-tensor
tables), ``traffic`` (bytes moved per step), ``specs`` (every compiled
specialization), ``eco_step`` and ``e4m3`` (the Triton code).
"""

from __future__ import annotations

from .launcher import has_kernel, interpreter_enabled, supports, unavailable_reason
from .steps import (
    adamw_step_,
    adamw_steps_,
    codec_covers,
    dequantize,
    plain_adamw_step_,
    plain_adamw_steps_,
    plain_sgd_step_,
    plain_sgd_steps_,
    quantize,
    sgd_step_,
    sgd_steps_,
)
from .traffic import plain_step_bytes, step_bytes

__all__ = [
    "supports", "unavailable_reason", "interpreter_enabled", "has_kernel", "codec_covers",
    "adamw_step_", "sgd_step_", "adamw_steps_", "sgd_steps_", "plain_adamw_step_", "plain_sgd_step_",
    "plain_adamw_steps_", "plain_sgd_steps_", "quantize", "dequantize", "step_bytes", "plain_step_bytes",
]
