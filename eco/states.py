"""Optimizer-state formats: how m and v are stored, as data beside the weight formats.

================  ======================================================  ==================
format            stored tensors (state-dict keys for ``exp_avg``)         bytes per element
================  ======================================================  ==================
``"fp32"``        ``exp_avg`` fp32                                         4
``"bf16"``        ``exp_avg`` bf16                                         2
``"int8"`` (m)    ``exp_avg`` int8 codes, ``exp_avg_scale`` fp32           1 + 4/128
``"fp8"``  (m)    ``exp_avg`` E4M3 codes, ``exp_avg_scale`` fp32           1 + 4/128
``"fp8"``  (v)    ``exp_avg_sq`` E4M3 codes of sqrt(v), ``_scale`` fp32    1 + 4/128
``"factored"``    ``exp_avg_sq_row`` / ``_col`` / ``_mean`` fp32 (v)       4 (R + C + 1) / (R C)
================  ======================================================  ==================

Every format below fp32 is written with stochastic rounding from the
tensor's own stream (:mod:`eco.rng`), so EMA increments much smaller than the
stored value survive in expectation; values saturate at the format's largest
finite value instead of becoming inf.

Blocks (8-bit formats): ``STATE_BLOCK`` consecutive elements of a row (the
last dimension; a 1-D tensor is one row), the last block of a row shorter when
the row is not a multiple of it. Scales are fp32, one per block, shaped
``[*shape[:-1], ceil(C / STATE_BLOCK)]``: local to rows, so a dim-0 shard owns
its state scales as it owns its weight scales. ``scale = absmax / rho``,
``inv_scale = rho / absmax`` (IEEE division); a block whose absmax is at most
``ZERO_GROUP_ABSMAX`` stores code 0 with scale 1.

- ``int8`` (m): codes in [-127, 127], rho = 127; ``q = floor(y) + (u < y - floor(y))``.
- ``fp8`` (m): E4M3 codes, rho = 448, rounded like an FP8 weight (``FP8.round_stochastic``).
- ``fp8`` (v): v is non-negative and spans many decades, so the code holds
  ``s = sqrt(v)`` (half the decades of v) in E4M3, rho = 448, and rounds
  between the neighbouring grid values ``lo <= y <= hi`` (``y = s * inv_scale``)
  with the probability that makes the *square* unbiased:
  ``p(up) = (y*y - lo*lo) / (hi*hi - lo*lo)``, so ``E[stored v] = v``. A
  positive v never rounds to zero: it stores at least the smallest positive
  code (``2**-9 * scale``). Decoded as ``(code * scale) ** 2``.
- ``factored`` (v): Adafactor-style. For a tensor of shape ``(*E, R, C)``
  (``E``: experts, possibly none) the state is the EMA of the row means of
  g*g (``row``, ``[*E, R]``), of the column means (``col``, ``[*E, C]``) and
  of the mean (``mean``, ``[*E]``). The step reads
  ``v_old[i, j] = row[i] * (col[j] / mean)`` (0 where ``mean == 0``) in place
  of a stored v and adds this step's exact ``(1 - b2) * g*g``: the current
  gradient is never approximated. 1-D tensors keep a full fp32 v. The means
  are exact sums of g*g in 64-bit fixed point (see ``eco.reference``), so any
  order of summation, any piece and any shard gives the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .formats import FP8, FP8_MAX, absmax_scales

STATE_BLOCK = 128
INT8_MAX = 127.0
BF16_MAX_BITS = 0x7F7F0000  # the largest finite bf16, as fp32 bits
_FP8_SR = FP8()
_FP8_MIN_POSITIVE = 2.0**-9  # smallest positive E4M3 value (a subnormal)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (IEEE, as CUDA, inductor and the kernels compute it).

    torch's eager CPU ``sqrt`` is not: it is one ulp off for about 20% of fp32
    values (torch 2.13, AVX2 and default builds), which would make CPU and GPU
    results differ. numpy's fp32 sqrt is exact; so is the code torch.compile
    generates (checked by tests/test_compiled.py).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.asarray(np.sqrt(x.contiguous().numpy())))  # 0-d: np.sqrt gives a numpy scalar
    return torch.sqrt(x)


@dataclass(frozen=True)
class StateFormat:
    """How one optimizer state (m or v) is stored. ``parts`` are the suffixes of its state-dict keys."""

    name: str
    parts: tuple[str, ...] = ("",)
    #: dtypes of the stored tensors, in ``parts`` order
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    @property
    def stochastic(self) -> bool:
        """Whether storing draws random numbers (every format below fp32 does)."""
        return self.name != "fp32"

    def shapes(self, shape) -> tuple[tuple[int, ...], ...]:
        shape = tuple(shape)
        if len(self.parts) == 2:  # codes + block scales
            cols = shape[-1] if shape else 1
            return shape, (*shape[:-1], -(-cols // STATE_BLOCK))
        return (shape,)

    def nbytes(self, shape) -> int:
        """Bytes of the tensors that hold this state for a tensor of ``shape`` (what :meth:`allocate` makes)."""
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes(shape), self.dtypes, strict=True))

    def allocate(self, shape, device) -> tuple[torch.Tensor, ...]:
        """Zero state (every format stores 0 as all-zero codes with scale 1)."""
        tensors = []
        for part_shape, dtype, suffix in zip(self.shapes(shape), self.dtypes, self.parts, strict=True):
            fill = 1.0 if suffix == "_scale" else 0.0
            tensors.append(torch.full(part_shape, fill, dtype=torch.float32, device=device).to(dtype))
        return tuple(tensors)

    def keys(self, name: str) -> tuple[str, ...]:
        return tuple(name + suffix for suffix in self.parts)

    def check(self, tensors, shape, what: str) -> None:
        """Raise a ValueError that says what is wrong if ``tensors`` are not a valid state of this format."""
        expected = self.shapes(shape)
        if len(tensors) != len(expected):
            raise ValueError(f"{what}: expected {len(expected)} tensors for state format {self.name!r}")
        for t, part_shape, dtype, suffix in zip(tensors, expected, self.dtypes, self.parts, strict=True):
            if tuple(t.shape) != tuple(part_shape) or t.dtype != dtype:
                raise ValueError(
                    f"{what}{suffix} is a {t.dtype} tensor of shape {tuple(t.shape)}, but state format "
                    f"{self.name!r} stores {dtype} of shape {tuple(part_shape)}: the state_dict was saved "
                    "with other state formats (momentum=/second_moment=) or belongs to another model")
            values = t.float() if t.dtype != torch.int8 else None
            if values is not None and not torch.isfinite(values).all():
                raise ValueError(f"{what}{suffix} holds NaN or inf: the saved optimizer state is corrupt")

    # ------------------------------------------------------------ pieces of rows
    def load(self, tensors) -> torch.Tensor:
        """fp32 values of a piece (``tensors`` viewed as ``[P, C]`` values and ``[P, nb]`` scales)."""
        return tensors[0].float()

    def store_(self, tensors, x: torch.Tensor, key: rng.StreamKey | None) -> None:
        """Write fp32 values ``x`` (``[P, C]``, ``|x| <= 2**126``) into a piece of the state."""
        tensors[0].copy_(x)


@dataclass(frozen=True)
class BF16(StateFormat):
    """bf16 values, stochastically rounded on the bits: add 16 random bits below the kept 16, truncate."""

    name: str = "bf16"
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    def store_(self, tensors, x, key):
        tensors[0].copy_(round_bf16_stochastic(x, rng.bits16(key, x.shape, x.device)))


def round_bf16_stochastic(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to a bf16 value (returned as fp32) up with probability (low 16 bits) / 2**16.

    Works on the magnitude bits, so it is unbiased for either sign; saturates at
    the largest finite bf16 instead of carrying into inf.
    """
    bits = x.view(torch.int32)
    magnitude = torch.minimum((bits & 0x7FFFFFFF) + random16, torch.full_like(bits, BF16_MAX_BITS | 0xFFFF))
    rounded = magnitude & -65536
    return (rounded | (bits & -2147483648)).view(torch.float32)


@dataclass(frozen=True)
class Block8(StateFormat):
    """8-bit codes with one fp32 absmax scale per ``STATE_BLOCK`` elements of a row (see module docstring)."""

    name: str = "int8"
    parts: tuple[str, ...] = ("", "_scale")
    dtypes: tuple[torch.dtype, ...] = (torch.int8, torch.float32)
    rho: float = INT8_MAX
    #: "signed" (m: int8 or E4M3 codes of the value) or "sqrt" (v: E4M3 codes of sqrt(v))
    kind: str = "signed"

    def load(self, tensors):
        codes, scales = tensors
        values = _blocks(codes.float()) * scales.unsqueeze(-1)
        if self.kind == "sqrt":
            values = values * values
        return _unblock(values, codes.shape[-1])

    def store_(self, tensors, x, key):
        codes, scales = tensors
        cols = x.shape[-1]
        u = _blocks(rng.uniform(key, x.shape, x.device))
        xb = _blocks(sqrt_rn(x) if self.kind == "sqrt" else x)
        scale, inv_scale = absmax_scales(xb.abs().amax(dim=-1, keepdim=True), self.rho)
        y = (xb * inv_scale).clamp(-self.rho, self.rho)
        if self.dtypes[0] == torch.int8:
            lower = torch.floor(y)
            grid = torch.where(u < y - lower, lower + 1, lower)
        elif self.kind == "signed":
            grid = _FP8_SR.round_stochastic(y, None, uniform=lambda _: u)
        else:
            grid = _round_square_stochastic(y, u, xb > 0)
        codes.copy_(_unblock(grid, cols).to(codes.dtype))
        scales.copy_(scale.squeeze(-1))


def _round_square_stochastic(y: torch.Tensor, u: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """E4M3 grid value of ``y >= 0`` such that E[grid**2] = y**2; at least the smallest positive code if positive."""
    mag = y
    binade = ((mag.view(torch.int32) >> 23) - 127).clamp_(min=-6)
    ulp = ((binade + (127 - 3)) << 23).view(torch.float32)
    lo = torch.floor(mag / ulp) * ulp
    hi = torch.clamp(lo + ulp, max=FP8_MAX)
    up = u * (hi * hi - lo * lo) < y * y - lo * lo
    grid = torch.where(up, hi, lo)
    return torch.where(positive & (grid == 0), torch.full_like(grid, _FP8_MIN_POSITIVE), grid)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[P, C]`` -> ``[P, nb, STATE_BLOCK]``, the last block zero-padded when C is not a multiple."""
    rows, cols = x.shape
    pad = -cols % STATE_BLOCK
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(rows, -1, min(STATE_BLOCK, cols + pad))


def _unblock(xb: torch.Tensor, cols: int) -> torch.Tensor:
    out = xb.reshape(xb.shape[0], -1)
    return out if out.shape[1] == cols else out[:, :cols]


@dataclass(frozen=True)
class Factored(StateFormat):
    """Row, column and overall EMAs of g*g (see module docstring); the step logic is in ``eco.reference``."""

    name: str = "factored"
    parts: tuple[str, ...] = ("_row", "_col", "_mean")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float32, torch.float32)

    @property
    def stochastic(self) -> bool:
        return True  # the fixed-point sums of g*g round stochastically

    def shapes(self, shape):
        shape = tuple(shape)
        return shape[:-1], (*shape[:-2], shape[-1]), shape[:-2]


FP32_STATE = StateFormat("fp32")
BF16_STATE = BF16()
INT8_STATE = Block8()
FP8_M_STATE = Block8(name="fp8", dtypes=(torch.float8_e4m3fn, torch.float32), rho=FP8_MAX)
FP8_V_STATE = Block8(name="fp8", dtypes=(torch.float8_e4m3fn, torch.float32), rho=FP8_MAX, kind="sqrt")
FACTORED_STATE = Factored()

MOMENTUM_FORMATS = {"fp32": FP32_STATE, "bf16": BF16_STATE, "int8": INT8_STATE, "fp8": FP8_M_STATE}
SECOND_MOMENT_FORMATS = {"fp32": FP32_STATE, "bf16": BF16_STATE, "fp8": FP8_V_STATE, "factored": FACTORED_STATE}
#: what ``"8bit"`` means for each state. m: int8 and E4M3 gave the same loss
#: (bench/results/state_formats_fp8.md); int8 spends its 255 levels evenly over a
#: block. v: a non-negative value of wide range, stored as E4M3 of sqrt(v).
EIGHT_BIT = {"momentum": "int8", "second_moment": "fp8"}


def momentum_format(name: str) -> StateFormat:
    name = EIGHT_BIT["momentum"] if name == "8bit" else name
    if name not in MOMENTUM_FORMATS:
        raise ValueError(f"momentum must be one of {(*MOMENTUM_FORMATS, '8bit')}, got {name!r}")
    return MOMENTUM_FORMATS[name]


def second_moment_format(name: str) -> StateFormat:
    name = EIGHT_BIT["second_moment"] if name == "8bit" else name
    if name not in SECOND_MOMENT_FORMATS:
        raise ValueError(f"second_moment must be one of {(*SECOND_MOMENT_FORMATS, '8bit')}, got {name!r}")
    return SECOND_MOMENT_FORMATS[name]


def for_shape(fmt: StateFormat, shape) -> StateFormat:
    """The format a tensor of ``shape`` really gets: a factored v needs two dimensions (1-D: full fp32 v)."""
    if isinstance(fmt, Factored) and len(shape) < 2:
        return FP32_STATE
    return fmt


def replicated_parts(fmt: StateFormat, shape) -> tuple[str, ...]:
    """Suffixes of the parts that are not local to dim-0 rows: a dim-0 shard holds a full copy of them.

    Only a factored v of a 2-D tensor has such parts (``_col``, ``_mean``: one per matrix, and the
    matrix is split across the shards); every other part is sliced with the parameter's rows.
    """
    return ("_col", "_mean") if isinstance(fmt, Factored) and len(shape) == 2 else ()


__all__ = ["StateFormat", "STATE_BLOCK", "MOMENTUM_FORMATS", "SECOND_MOMENT_FORMATS", "momentum_format",
           "second_moment_format", "for_shape", "replicated_parts", "round_bf16_stochastic", "sqrt_rn"]
