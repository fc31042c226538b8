"""The HBM byte model of the kernels: bytes one step moves, per tensor.

Bytes per parameter per step (bf16 gradient, a large weight, scales of 128
elements on the block/group formats; an 8-bit state adds ``8 / 128`` for its
block scales, read and written). Row-wise FP8 and tensor-wise INT4 take two
passes; the first re-reads gradient, codes and moments (in parentheses),
counted in full, the worst case when the tensor does not stay in L2. A
factored second moment stores per row and column only (nothing per element)
and re-reads the gradient once for its statistics:

============================  =========  ==================  ==================
optimizer, states             format     block/group scales  row/tensor scales
============================  =========  ==================  ==================
AdamW, fp32 m, fp32 v         FP8        20.06               31 (+11)
AdamW, fp32 m, fp32 v         INT4       19.06               29.5 (+10.5)
AdamW, bf16 m, bf16 v         FP8        12.06               19 (+7)
AdamW, bf16 m, bf16 v         INT4       11.06               17.5 (+6.5)
AdamW, int8 m, factored v     FP8        8.13                12.1 (+4.03)
AdamW, int8 m, factored v     INT4       7.13                10.6 (+3.53)
AdamW, int8 m, fp8 v          FP8        8.19                13.19 (+5.06)
AdamW, int8 m, fp8 v          INT4       7.19                11.69 (+4.56)
SGD, fp32 m                   FP8        12.06               19 (+7)
SGD, fp32 m                   INT4       11.06               17.5 (+6.5)
SGD, bf16 m                   FP8        8.06                13 (+5)
SGD, bf16 m                   INT4       7.06                11.5 (+4.5)
SGD, int8 m                   FP8        6.12                10.1 (+4.03)
SGD, int8 m                   INT4       5.12                8.59 (+3.53)
============================  =========  ==================  ==================

(AdamW FP8 bf16: read g 2 + codes 1 + m 2 + v 2, write codes 1 + m 2 + v 2.)
An fp32 gradient adds 2 (4 on row/tensor formats; 2 more with a factored
v). torch AdamW with fp32 master weights, bf16 weights and bf16 gradients
moves 28: read g 2, master 4, m 4, v 4; write master 4, m 4, v 4, bf16 weight
2. Plain parameters: read p, g, m, v and write p, m, v (28 with fp32
everything, 16 with bf16 param and states). ``tests/test_kernels.py`` holds
this table to :func:`step_bytes`, and ``tests/test_aot_compile.py`` to the
compiled code's loads and stores.
"""

from __future__ import annotations

import math

import torch

from eco import states as state_formats
from eco.formats import QuantFormat

#: the rows of the table above: (optimizer, (m, v) state formats)
TABLE_STATES = (("adamw", ("fp32", "fp32")), ("adamw", ("bf16", "bf16")), ("adamw", ("int8", "factored")),
                ("adamw", ("int8", "fp8")), ("sgd", ("fp32", None)), ("sgd", ("bf16", None)), ("sgd", ("int8", None)))


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _moment_bytes(optimizer: str, states: tuple, shape) -> tuple[int, bool]:
    """Bytes of the moments of a tensor of ``shape`` in their formats, and whether v is factored."""
    m, v = states
    total = state_formats.momentum_format(m).nbytes(shape)
    factored = False
    if optimizer == "adamw":
        v_fmt = state_formats.for_shape(state_formats.second_moment_format(v), shape)
        factored = isinstance(v_fmt, state_formats.Factored)
        total += v_fmt.nbytes(shape)
    return total, factored


def launch_bytes(fmt: QuantFormat, shape, *, optimizer: str = "adamw", states: tuple = ("bf16", "bf16"),
                 grad_dtype=torch.bfloat16, launch: str = "step") -> int:
    """HBM bytes of one launch of a quantized weight's step (``states``: (m, v) format names).

    ``launch``: ``"step"`` (reads gradient, codes, scales and moments; writes
    codes, scales and moments), ``"absmax"`` (the first pass of row-wise FP8
    and tensor-wise INT4: reads them), ``"stats"`` (a factored second
    moment's statistics: reads the gradient).
    """
    n = math.prod(shape)
    codes = math.prod(fmt.code_shape(shape))
    scales = 4 * math.prod(fmt.scale_shape(shape))
    grad = n * _size(grad_dtype)
    moments, _ = _moment_bytes(optimizer, states, shape)
    reads = grad + codes + moments + scales
    return {"step": reads + codes + moments + scales, "absmax": reads, "stats": grad}[launch]


def step_bytes(fmt: QuantFormat, shape, *, optimizer: str = "adamw", states: tuple = ("bf16", "bf16"),
               grad_dtype=torch.bfloat16) -> int:
    """HBM bytes one fused step of a quantized weight moves (the table above): its launches'
    (:func:`launch_bytes`), the first pass of row-wise FP8 and tensor-wise INT4 and a factored second
    moment's statistics counted in full."""
    launches = ["step"] + (["absmax"] if fmt.group_size is None else [])
    if _moment_bytes(optimizer, states, shape)[1]:
        launches.append("stats")
    return sum(launch_bytes(fmt, shape, optimizer=optimizer, states=states, grad_dtype=grad_dtype, launch=launch)
               for launch in launches)


def plain_step_bytes(numel: int, *, optimizer: str = "adamw", param_dtype=torch.float32, grad_dtype=None,
                     state_dtype=torch.float32) -> int:
    """HBM bytes of a plain (unquantized) step with fp32/bf16 states: read p, g, m(, v); write p, m(, v)."""
    moments = numel * _size(state_dtype) * (2 if optimizer == "adamw" else 1)
    return 2 * numel * _size(param_dtype) + numel * _size(grad_dtype or param_dtype) + 2 * moments


def row_label(optimizer: str, states: tuple) -> str:
    """The first column of the table above: ``"AdamW, int8 m, factored v"``."""
    m, v = states
    return f"AdamW, {m} m, {v} v" if optimizer == "adamw" else f"SGD, {m} m"
