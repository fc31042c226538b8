"""FP8 E4M3 (``torch.float8_e4m3fn``) encoded and decoded on the bits, as Triton helpers.

Why not ``x.to(tl.float8e4nv)``: Triton's CPU interpreter rounds wrongly when
rounding carries into the exponent (1.9895 became 1.0, not 2.0), and sm_80
(A100) has no FP8 conversion instruction. Doing it on the fp32 bit pattern is
exact everywhere, and the codes tensor is stored as its ``uint8`` view.

E4M3 layout: sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Normal
values ``2**-6 <= |x| <= 448``; below ``2**-6`` the subnormals ``k * 2**-9``
(k = 0..7); byte ``0x7F``/``0xFF`` is NaN and there is no infinity.

:func:`encode_nearest` rounds to nearest, ties to even, exactly as torch's cast
for every ``|x| <= 448``; larger magnitudes (and inf) saturate to 448, as
torch 2.13's CPU cast does; NaN encodes as +0 (torch keeps NaN) so that a code
is never NaN. :func:`encode_native`/:func:`decode_native` are the same
conversions with the sm_89+ instructions (fewer SASS instructions); the kernels
take them only when compiled for such a target (``TARGET >= 89``).
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_SUBNORMAL_STEP = tl.constexpr(2.0**-9)
# Globals a @triton.jit function reads must be tl.constexpr, or compiling for a GPU
# fails (the interpreter does not check). Adding then subtracting 1.5 * 2**23 rounds an fp32 of magnitude < 2**22 to the
# nearest integer, ties to even (the fp32 spacing there is exactly 1).
ROUND_MAGIC = tl.constexpr(12582912.0)
E4M3_MAX_CODE = tl.constexpr(0x7E)  # 448 = 1.75 * 2**8
# (fp32 biased exponent 121 = 2**-6, mantissa 0) >> 20 minus E4M3 code 0x08 for 2**-6.
FP32_TO_E4M3_SHIFTED_BIAS = tl.constexpr((121 << 3) - 0x08)
TWO_POW_120 = tl.constexpr(2.0**120)
TWO_POW_33 = tl.constexpr(2.0**33)


@triton.jit
def round_half_even(x):
    """Nearest integer (as fp32), ties to even, for ``|x| < 2**22``."""
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def encode_nearest(x):
    """fp32 -> E4M3 byte (int32 in [0, 255]), round to nearest even, saturating at 448."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # Normal range: round the fp32 mantissa to 3 bits on the integer pattern (ties
    # to even: add 0x7FFFF plus the lowest kept bit); a carry moves into the exponent.
    kept_lsb = (mag_bits >> 20) & 1
    rounded = (mag_bits + 0x7FFFF + kept_lsb) >> 20
    normal = tl.minimum(rounded - FP32_TO_E4M3_SHIFTED_BIAS, E4M3_MAX_CODE)
    # Subnormal range: the codes 0..8 are the integer multiples of 2**-9 (8 is 2**-6).
    subnormal = round_half_even(mag * 512.0).to(tl.int32)
    code = tl.where(mag < 0.015625, subnormal, normal)
    code = code | sign
    return tl.where(mag_bits > 0x7F800000, 0, code)


@triton.jit
def decode(byte):
    """E4M3 byte (any integer type holding 0..255) -> fp32 value (NaN for 0x7F/0xFF, as torch).

    The 7 magnitude bits placed at fp32 bits 20..26 read as an fp32 (a subnormal
    one for E4M3 subnormals) equal the value times 2**-120, so one exact
    multiplication by 2**120 decodes normals and subnormals alike.
    """
    b = byte.to(tl.int32) & 0xFF
    magnitude = ((b & 0x7F) << 20).to(tl.float32, bitcast=True) * TWO_POW_120
    magnitude = tl.where((b & 0x7F) == 0x7F, float("nan"), magnitude)
    return (magnitude.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def encode_native(x):
    """:func:`encode_nearest` with the sm_89+ conversion (``cvt.rn.satfinite.e4m3x2.f32``), for ``|x| <= 448``.

    Same codes for every finite ``|x| <= 448`` (the callers clamp first); not for
    sm_80, which has no such instruction, nor for the interpreter, whose fp8 cast
    rounds wrongly when the mantissa carries into the exponent.
    """
    return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def decode_native(byte):
    """:func:`decode` with the sm_89+ conversion (E4M3 -> f16 -> fp32, both exact)."""
    return byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def round_stochastic(y, r):
    """Stochastically round ``|y| <= 448`` onto the E4M3 grid with 32 random bits ``r`` (uint32).

    The distribution of ``eco.formats.FP8.round_stochastic``: the grid spacing
    at ``|y|`` is ``2**(e - 3)`` in the binade ``[2**e, 2**(e+1))``, ``e >= -6``
    (``2**-9`` below); round up with probability (distance to the lower grid
    point) / spacing. Normal range: add 20 random bits below the 3 kept
    mantissa bits of the fp32 pattern and truncate (a carry moves into the
    exponent). Subnormal range (``|y| < 2**-6``): the same in 24-bit fixed
    point, ``|y| * 2**33``. Exactly unbiased for ``|y| >= 2**-10``; below, the
    bits of ``|y|`` under ``2**-33`` are dropped. It is the reference's decision
    with ``u = (~r >> 8 & 0xFFFFFF) / 2**24`` (see the tests). Returns the fp32
    grid value, sign kept (``-0.0`` stays negative).
    """
    bits = y.to(tl.int32, bitcast=True)
    mag_bits = bits & 0x7FFFFFFF
    normal = ((mag_bits + (r >> 12).to(tl.int32)) & -0x100000).to(tl.float32, bitcast=True)
    fixed = (tl.minimum(mag_bits.to(tl.float32, bitcast=True), 0.015625) * TWO_POW_33).to(tl.int32)
    subnormal = ((fixed + (r >> 8).to(tl.int32)) >> 24).to(tl.float32) * FP8_SUBNORMAL_STEP
    out = tl.where(mag_bits < (121 << 23), subnormal, normal)
    return (out.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
