"""The HBM byte model of the kernels: bytes one step moves, per tensor.

Bytes per parameter per step (bf16 gradient, a large weight; scales add
``8 / group_size`` bytes on block/group formats, ~0 on row/tensor formats).
Row-wise FP8 and tensor-wise INT4 take two passes; the first re-reads
gradient, codes and moments (in parentheses), counted in full, the worst case
when the tensor does not stay in L2:

=================  =========  ==================  ==================
optimizer, state   format     block/group scales  row/tensor scales
=================  =========  ==================  ==================
AdamW, bf16 m, v   FP8        12                  19 (+7 re-read)
AdamW, bf16 m, v   INT4       11                  17.5 (+6.5)
AdamW, fp32 m, v   FP8        20                  31 (+11)
AdamW, fp32 m, v   INT4       19                  29.5 (+10.5)
SGD, bf16 m        FP8        8                   13 (+5)
SGD, bf16 m        INT4       7                   11.5 (+4.5)
SGD, fp32 m        FP8        12                  19 (+7)
SGD, fp32 m        INT4       11                  17.5 (+6.5)
=================  =========  ==================  ==================

(AdamW FP8 bf16: read g 2 + codes 1 + m 2 + v 2, write codes 1 + m 2 + v 2.)
An fp32 gradient adds 2 (4 on row/tensor formats). torch AdamW with fp32
master weights, bf16 weights and bf16 gradients moves 28: read g 2, master 4,
m 4, v 4; write master 4, m 4, v 4, bf16 weight 2. Plain parameters: read p,
g, m, v and write p, m, v (28 with fp32 everything, 16 with bf16 param and
states). ``tests/test_kernels.py`` holds this table to :func:`step_bytes`, and
``tests/test_aot_compile.py`` to the compiled code's loads and stores.
"""

from __future__ import annotations

import math

import torch

from eco.formats import QuantFormat


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def step_bytes(fmt: QuantFormat, shape, *, optimizer: str = "adamw", state_dtype=torch.bfloat16,
               grad_dtype=torch.bfloat16) -> int:
    """HBM bytes one fused step of a quantized weight moves (the table above).

    Reads gradient, codes, scales and moments; writes codes, scales and
    moments. Row-wise FP8 and tensor-wise INT4 read gradient, codes and
    moments a second time (pass 0), counted in full.
    """
    n = math.prod(shape)
    codes = math.prod(fmt.code_shape(shape))
    scales = 4 * math.prod(fmt.scale_shape(shape))
    grad = n * _size(grad_dtype)
    moments = n * _size(state_dtype) * (2 if optimizer == "adamw" else 1)
    total = (grad + codes + moments + scales) + (codes + moments + scales)
    if fmt.group_size is None:
        total += grad + codes + moments + scales
    return total


def plain_step_bytes(numel: int, *, optimizer: str = "adamw", param_dtype=torch.float32, grad_dtype=None,
                     state_dtype=torch.float32) -> int:
    """HBM bytes of a plain (unquantized) step: read p, g, m(, v); write p, m(, v)."""
    moments = numel * _size(state_dtype) * (2 if optimizer == "adamw" else 1)
    return 2 * numel * _size(param_dtype) + numel * _size(grad_dtype or param_dtype) + 2 * moments
