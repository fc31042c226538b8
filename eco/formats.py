"""Quantization formats: how a weight is stored as codes plus scales.

A format is data, not a branch in every function. Every format here is
symmetric with zero-point 0 and an absmax scale, applied to *groups* of
consecutive elements:

=====================  =====================  ===========================
format                 group                  scale tensor shape
=====================  =====================  ===========================
``FP8()``              one row (last dim)     ``[*shape[:-1], 1]``
``FP8(group_size=G)``  G elements of a row    ``[*shape[:-1], C // G]``
``INT4()``             one matrix (last two)  ``[*shape[:-2], 1, 1]``
``INT4(group_size=G)`` G elements of a row    ``[*shape[:-1], C // G]``
=====================  =====================  ===========================

``FP8(block_size=B)`` is accepted as another spelling of ``FP8(group_size=B)``.

Scales are fp32 and stay local to rows, groups or (for tensor-wise INT4) to
one matrix of a stacked 3-D expert tensor, so a shard along dim 0 owns its
scales. For a group with absmax ``a``::

    scale = a / rho          inv_scale = rho / a          (fp32, IEEE division)
    code  = round(clamp(x * inv_scale, -rho, rho))
    deq   = code * scale

Groups with ``a <= ZERO_GROUP_ABSMAX`` (all zeros, or values so tiny that
``rho / a`` would overflow) store code 0 with scale 1. A NaN absmax is never
such a group: it propagates (the optimizer step never produces one, see
``eco.reference``; :meth:`QuantFormat.quantize` requires finite input).

Codes: FP8 uses ``torch.float8_e4m3fn`` (rho = 448). INT4 uses integers in
[-7, 7] (rho = 7) packed two per byte along the last dimension: element
``2k`` in the low nibble, ``2k + 1`` in the high nibble, each stored as
``code + 8``; an odd last dimension is padded with code 0.

Rounding is ``"nearest"`` (ties to even) or ``"stochastic"`` (round up with
probability equal to the distance from the lower grid point, so that the
expectation of the stored value equals the input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass

import torch

#: Where stochastic rounding gets its randomness: ``uniform(y)`` returns fp32
#: values in [0, 1) shaped like ``y``, one per element in ``y``'s (row-major) order.
UniformSource = Callable[[torch.Tensor], torch.Tensor]

ROUNDINGS = ("nearest", "stochastic")
#: dtypes the optimizer stores its moments (and the kernels read and write them) in
STATE_DTYPES = (torch.float32, torch.bfloat16)
ZERO_GROUP_ABSMAX = 2.0**-100
FP8_MAX = 448.0
# E4M3: 3 mantissa bits; the smallest normal exponent is -6, so below 2**-6
# the grid is uniform with spacing 2**-9 (the subnormals).
FP8_MANTISSA_BITS = 3
FP8_MIN_NORMAL_EXP = -6


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


@dataclass(frozen=True)
class QuantFormat:
    """Fields shared by every format; subclasses fix ``rho`` and the code layout.

    ``group_size``: elements of a row per scale, or None for one scale per row
    (FP8) or per matrix (INT4).
    """

    group_size: int | None = None
    name = "base"
    rho = 0.0

    @property
    def tensorwise(self) -> bool:
        """True when one scale covers a whole matrix (the last two dims)."""
        return False

    # ----------------------------------------------------------- shapes
    def check_shape(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise a ValueError that says what to do if ``shape`` cannot use this format."""
        if len(shape) < 2:
            raise ValueError(
                f"{self} quantizes matrices and stacked matrices (2-D or 3-D), got shape {tuple(shape)}; "
                "leave 1-D tensors (biases, norms) unquantized"
            )
        cols = shape[-1]
        gs = self.group_size
        if gs is not None and cols % gs != 0:
            raise ValueError(
                f"{self}: the last dimension ({cols}) of a weight of shape {tuple(shape)} is not a "
                f"multiple of the group size {gs}; choose a group size that divides it, or exclude "
                "this weight with filter_fn"
            )

    def scale_shape(self, shape) -> tuple[int, ...]:
        if self.tensorwise:
            return (*shape[:-2], 1, 1)
        gs = self.group_size
        return (*shape[:-1], 1 if gs is None else shape[-1] // gs)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``[n_groups, group_elems]`` in the order of the flattened scales."""
        if self.tensorwise:  # leading dims spelled out: a matrix of no rows (an empty shard) is one empty group
            return x.reshape(x.shape[:-2].numel(), x.shape[-2] * x.shape[-1])
        return x.reshape(-1, self.group_size or x.shape[-1])

    def code_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape)

    # ----------------------------------------------------------- quantize
    def scales_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absmax scale and its reciprocal per group of fp32 ``x``; both ``[n_groups, 1]``."""
        return self.scale_pair(self.grouped(x).abs().amax(dim=1, keepdim=True))

    def scale_pair(self, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`absmax_scales` with this format's rho."""
        return absmax_scales(absmax, self.rho)

    def quantize(
        self, x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None, *,
        uniform: UniformSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a tensor; returns ``(codes, scales)``. ``x`` must be finite.

        Stochastic rounding draws its uniforms from ``generator`` (``torch.rand``),
        or from ``uniform`` when given (see :data:`UniformSource`).
        """
        check_rounding(rounding)
        self.check_shape(x.shape)
        x = x.float()
        scale, inv_scale = self.scales_for(x)
        y = (self.grouped(x) * inv_scale).clamp(-self.rho, self.rho)
        if rounding == "nearest":
            grid = self.round_nearest(y)
        else:
            grid = self.round_stochastic(y, generator, uniform=uniform)
        codes = self.encode(grid.reshape(x.shape))
        return codes, scale.reshape(self.scale_shape(x.shape))

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
        """``code * scale`` in fp32, then cast to ``dtype``."""
        grid = self.decode(codes, shape)
        groups = self.grouped(grid) * scales.reshape(-1, 1)
        return groups.reshape(shape).to(dtype)

    # ----------------------------------------------------------- per format
    def round_nearest(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def round_stochastic(self, y: torch.Tensor, generator, *, uniform=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def encode(self, grid: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, shape) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def config(self) -> dict:
        """A plain dict that rebuilds this format with :func:`format_from_config`."""
        return {"name": self.name, "group_size": self.group_size}


def absmax_scales(absmax: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(absmax / rho, rho / absmax)`` per group; ``(1, 0)`` for a (near-)zero group.

    Only ``absmax <= ZERO_GROUP_ABSMAX`` is a zero group: a NaN absmax is not
    (it propagates), so a non-finite value can never silently zero a group.
    """
    live = ~(absmax <= ZERO_GROUP_ABSMAX)
    safe = torch.where(live, absmax, torch.ones_like(absmax))
    # Tensor / tensor: torch computes ``number / tensor`` (and, on CUDA, ``tensor / number``) as a
    # multiplication by a reciprocal, one ulp off for about a quarter of values; kernels divide exactly.
    rho_t = torch.full_like(safe, rho)
    scale = torch.where(live, safe / rho_t, torch.ones_like(absmax))
    inv_scale = torch.where(live, rho_t / safe, torch.zeros_like(absmax))
    return scale, inv_scale


def _uniform_like(y: torch.Tensor, generator: torch.Generator | None, uniform: UniformSource | None) -> torch.Tensor:
    if uniform is not None:
        return uniform(y)
    return torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)


@dataclass(frozen=True)
class FP8(QuantFormat):
    """FP8 E4M3 codes; one fp32 scale per row, or per ``group_size`` elements of a row.

    ``block_size`` is another name for ``group_size`` (the FP8 literature says block).
    """

    block_size: InitVar[int | None] = None
    name = "fp8"
    rho = FP8_MAX

    def __post_init__(self, block_size):
        if block_size is not None:
            if self.group_size is not None and self.group_size != block_size:
                raise ValueError(f"FP8 got group_size={self.group_size} and block_size={block_size}; pass one")
            object.__setattr__(self, "group_size", block_size)
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or gs <= 0):
            raise ValueError(f"FP8 group_size must be a positive int or None, got {gs!r}")

    def __str__(self):
        return "FP8(row)" if self.group_size is None else f"FP8(group_size={self.group_size})"

    def round_nearest(self, y):
        return y.to(torch.float8_e4m3fn).float()

    def round_stochastic(self, y, generator, *, uniform=None):
        # The E4M3 grid spacing at |y|: 2**(e - 3) for |y| in [2**e, 2**(e+1)),
        # e >= -6; uniform 2**-9 below 2**-6. All of these are exact in fp32.
        # e and 2**(e - 3) are read and built on the fp32 bits (frexp/ldexp are slow on CPU).
        mag = y.abs()
        binade = ((mag.view(torch.int32) >> 23) - 127).clamp_(min=FP8_MIN_NORMAL_EXP)
        ulp = ((binade + (127 - FP8_MANTISSA_BITS)) << 23).view(torch.float32)
        units = mag / ulp  # exact: ulp is a power of two
        lower = torch.floor(units)
        up = _uniform_like(y, generator, uniform) < (units - lower)
        out = (torch.where(up, lower + 1, lower) * ulp).clamp(max=FP8_MAX)
        return torch.copysign(out, y)

    def encode(self, grid):
        return grid.to(torch.float8_e4m3fn)

    def decode(self, codes, shape):
        return codes.float().reshape(shape)


@dataclass(frozen=True)
class INT4(QuantFormat):
    """Symmetric INT4 codes in [-7, 7], two per byte; one scale per matrix or per group."""

    name = "int4"
    rho = 7.0

    def __post_init__(self):
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or gs <= 0 or gs % 2):
            raise ValueError(f"INT4 group_size must be a positive even int or None, got {gs!r}")

    @property
    def tensorwise(self) -> bool:
        return self.group_size is None

    def __str__(self):
        return "INT4(tensor)" if self.group_size is None else f"INT4(group_size={self.group_size})"

    def round_nearest(self, y):
        return torch.round(y)

    def round_stochastic(self, y, generator, *, uniform=None):
        lower = torch.floor(y)
        up = _uniform_like(y, generator, uniform) < (y - lower)
        return torch.where(up, lower + 1, lower).clamp(-self.rho, self.rho)

    def code_shape(self, shape):
        return (*shape[:-1], (shape[-1] + 1) // 2)

    def encode(self, grid):
        values = grid.to(torch.int8)
        if torch.compiler.is_compiling() and hasattr(torch.ops.prims, "inductor_force_stride_order"):
            # Store the int8 values before packing: else inductor fuses the whole update into the
            # packing loop, whose stride-2 reads it does not vectorize.
            values = torch.ops.prims.inductor_force_stride_order(values, values.stride())
        return pack_int4(values)

    def decode(self, codes, shape):
        return unpack_int4(codes, shape[-1]).float()


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last dim (see module docstring)."""
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    nibbles = (values + 8).to(torch.uint8)  # no int16 step: inductor vectorizes int8 but not int16
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; returns int8 with last dim ``cols``."""
    wide = packed.to(torch.int32)  # inductor runs uint8 arithmetic in part-filled vectors
    low = ((wide & 0xF) - 8).to(torch.int8)
    high = ((wide >> 4) - 8).to(torch.int8)
    both = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return both[..., :cols]


def format_from_config(config: dict) -> QuantFormat:
    name = config.get("name")
    if name == "fp8":
        return FP8(group_size=config.get("group_size"))
    if name == "int4":
        return INT4(group_size=config.get("group_size"))
    raise ValueError(f"unknown quantization format config {config!r}")


# Short names for formats (benchmark options, result files, kernel names): fp8-row, fp8-block<G>, int4-tensor,
# int4-group<G>.
_TAG_WORDS = {"fp8": ("row", "block"), "int4": ("tensor", "group")}


def format_tag(fmt: QuantFormat) -> str:
    """The short name of ``fmt``: ``"fp8-row"``, ``"fp8-block128"``, ``"int4-tensor"``, ``"int4-group32"``."""
    whole, grouped = _TAG_WORDS[fmt.name]
    return f"{fmt.name}-{whole}" if fmt.group_size is None else f"{fmt.name}-{grouped}{fmt.group_size}"


def format_from_tag(tag: str) -> QuantFormat:
    """The format a short name (:func:`format_tag`) stands for."""
    name, _, rest = tag.partition("-")
    whole, grouped = _TAG_WORDS.get(name, (None, None))
    if whole is not None and rest == whole:
        return format_from_config({"name": name, "group_size": None})
    if whole is not None and rest.startswith(grouped) and rest[len(grouped):].isdigit():
        return format_from_config({"name": name, "group_size": int(rest[len(grouped):])})
    raise ValueError(f"unknown format name {tag!r}; use fp8-row, fp8-block<G>, int4-tensor or int4-group<G>")


__all__ = ["FP8", "INT4", "QuantFormat", "format_from_config", "format_tag", "format_from_tag", "pack_int4",
           "unpack_int4", "ROUNDINGS", "STATE_DTYPES"]
