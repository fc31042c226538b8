"""The bit-level E4M3 codec (``eco.kernels.e4m3``): exact against torch, and compilable for A100.

sm_80 (A100) has no FP8 conversion (``tl.float8e4nv`` is rejected there), so
the kernels encode and decode E4M3 on the fp32 bits. Here a small kernel that
calls the codec runs under the interpreter and is compared bit for bit with
``torch.float8_e4m3fn``: all 256 codes, every tie between neighbouring codes,
subnormals, values rounding across a binade, saturation, signed zeros and
non-finite inputs under the codec's documented policy (|x| > 448 and inf
saturate to 448, NaN encodes as +0). Then the same kernel is compiled for
sm_80, sm_90 and sm_100. Compiled code cannot execute without a GPU: what is
proven for the targets is that the codec compiles there without spills, not
that it runs; the arithmetic is the same integer/fp32 code as interpreted.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from eco.formats import FP8
from eco.kernels import e4m3
from eco_bench.aot import TARGETS, KernelBuild, compile_builds

BLOCK = 1024
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors; the interpreter CPU ones


@triton.jit
def _codec_kernel(x_ptr, r_ptr, nearest_ptr, decoded_ptr, stochastic_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    code = e4m3.encode_nearest(x)
    tl.store(nearest_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(decoded_ptr + offs, e4m3.decode(code.to(tl.uint8)), mask=mask)
    # Stochastic rounding as the step kernel calls it: on a clamped, finite value.
    y = tl.minimum(tl.maximum(x, -448.0), 448.0)
    random_bits = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    grid = e4m3.round_stochastic(y, random_bits)
    tl.store(stochastic_ptr + offs, e4m3.encode_nearest(grid).to(tl.uint8), mask=mask)


def run_codec(x: torch.Tensor, r: torch.Tensor | None = None):
    """``(nearest codes, decode(nearest codes), stochastic codes)`` of fp32 ``x`` via the kernel.

    ``r``: the 32 random bits per element of stochastic rounding (int32, read as uint32).
    """
    x = x.float().contiguous().to(DEVICE)
    r = torch.zeros(x.shape, dtype=torch.int32, device=DEVICE) if r is None else r.contiguous().to(DEVICE)
    nearest = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    stochastic = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    decoded = torch.empty_like(x)
    _codec_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, r, nearest, decoded, stochastic, x.numel(), BLOCK=BLOCK)
    return nearest.cpu(), decoded.cpu(), stochastic.cpu()


def torch_codes(x: torch.Tensor) -> torch.Tensor:
    """torch's E4M3 bytes under the codec's policy: clamp to +-448 first (NaN stays NaN)."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


ALL_CODES = torch.arange(256, dtype=torch.uint8)
ALL_VALUES = ALL_CODES.view(torch.float8_e4m3fn).float()  # torch's decoding, NaN at 0x7F and 0xFF
FINITE = ~ALL_VALUES.isnan()


def neighbour_midpoints() -> torch.Tensor:
    """The exact midpoint between every pair of adjacent finite codes, both signs (fp32-exact)."""
    positive = ALL_VALUES[:0x7F]  # 0 .. 448, increasing
    mid = (positive[:-1].double() + positive[1:].double()) / 2
    assert torch.equal(mid.float().double(), mid)  # representable: the test compares exact ties
    return torch.cat([mid, -mid]).float()


def test_decode_all_256_codes_matches_torch():
    out = torch.empty(256, device=DEVICE)
    _decode_only[(1,)](ALL_CODES.to(DEVICE), out, BLOCK=256)
    out = out.cpu()
    assert torch.equal(out[FINITE].view(torch.int32), ALL_VALUES[FINITE].view(torch.int32))  # -0.0 included
    assert out[~FINITE].isnan().all()
    assert torch.equal(torch.signbit(out[~FINITE]), torch.signbit(ALL_VALUES[~FINITE]))


@triton.jit
def _decode_only(codes_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, e4m3.decode(tl.load(codes_ptr + offs)))


def test_encode_every_finite_code_value_round_trips():
    nearest, decoded, _ = run_codec(ALL_VALUES[FINITE])
    assert torch.equal(nearest, ALL_CODES[FINITE])  # 0x00 and 0x80: +0 and -0 keep their sign
    assert torch.equal(decoded.view(torch.int32), ALL_VALUES[FINITE].view(torch.int32))


def test_ties_round_to_even_and_neighbours_of_ties_round_to_nearest():
    mid = neighbour_midpoints()
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, float("inf")) * mid.sign())
    for x in (mid, below, above):
        nearest, _, _ = run_codec(x)
        assert torch.equal(nearest, torch_codes(x))
    # Ties go to the even code (last mantissa bit 0), and 254 ties were checked.
    nearest, _, _ = run_codec(mid)
    assert mid.numel() == 252 and bool(((nearest & 1) == 0).all())


@pytest.mark.parametrize(
    "values",
    [
        # subnormals (k * 2**-9), the smallest normal 2**-6, and values between them
        [2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 7.5 * 2.0**-9, 2.0**-6 - 2.0**-12, 2.0**-6, 2.0**-10, 2.0**-11],
        # rounding carries into the next binade (the interpreter's float8 cast gets 1.9895 wrong)
        [1.9895, 1.9375, 1.96875, 0.12109375, 3.875, 3.9375, 15.5, 240.0, 247.99, 248.0],
        # saturation: 448 is the largest code; beyond it the codec saturates by policy
        [448.0, 448.5, 463.99, 464.0, 500.0, 1e6, 3.4e38, float("inf")],
        # zeros and the tiny: below half the smallest subnormal rounds to zero
        [0.0, -0.0, 2.0**-10, 2.0**-10 + 2.0**-30, 1e-30, 2.0**-149],
    ],
    ids=["subnormals", "binade_carry", "saturation", "zeros"],
)
def test_edge_values_match_torch(values):
    x = torch.tensor(values, dtype=torch.float32)
    x = torch.cat([x, -x])
    nearest, decoded, _ = run_codec(x)
    assert torch.equal(nearest, torch_codes(x)), (x, nearest, torch_codes(x))
    expected = torch_codes(x).view(torch.float8_e4m3fn).float()
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


def test_nan_encodes_as_positive_zero():
    """The documented policy (a code is never NaN); torch would give 0x7F."""
    x = torch.tensor([float("nan"), -float("nan"), 1.0])
    nearest, _, _ = run_codec(x)
    assert nearest.tolist() == [0, 0, 0x38]


def test_random_values_across_the_range_match_torch():
    g = torch.Generator().manual_seed(1)
    exponent = torch.randint(-14, 10, (20000,), generator=g).float()
    x = torch.randn(20000, generator=g) * torch.exp2(exponent)
    nearest, decoded, _ = run_codec(x)
    assert torch.equal(nearest, torch_codes(x))
    assert torch.equal(decoded, torch_codes(x).view(torch.float8_e4m3fn).float())


def reference_uniform(random_bits: torch.Tensor) -> torch.Tensor:
    """The uniform under which ``eco.formats.FP8.round_stochastic`` decides as the kernel's bits do."""
    return ((~random_bits.long() >> 8) & 0xFFFFFF).float() / 2.0**24


def test_stochastic_rounding_matches_the_reference_bit_for_bit():
    """Random bits in, the reference's grid values out (given the corresponding uniforms)."""
    g = torch.Generator().manual_seed(2)
    exponent = torch.randint(-12, 9, (8192,), generator=g).float()
    y = (torch.randn(8192, generator=g) * torch.exp2(exponent)).clamp(-448.0, 448.0)
    tiny = torch.arange(1, 64, dtype=torch.float32) * 2.0**-15  # below the first subnormal 2**-9
    y = torch.cat([y, neighbour_midpoints(), ALL_VALUES[FINITE], tiny, -tiny,
                   torch.tensor([448.0, -448.0, 2.0**-10])])
    random_bits = torch.randint(-(2**31), 2**31, y.shape, generator=torch.Generator().manual_seed(3),
                                dtype=torch.int64).int()
    reference = FP8().round_stochastic(y, None, uniform=lambda _: reference_uniform(random_bits))
    _, _, stochastic = run_codec(y, random_bits)
    assert torch.equal(stochastic, reference.to(torch.float8_e4m3fn).view(torch.uint8))
    # Exact grid values never move; everything else lands on one of its two neighbours.
    on_grid = torch_codes(y).view(torch.float8_e4m3fn).float() == y
    assert torch.equal(stochastic[on_grid], torch_codes(y)[on_grid])
    # The extremes: no random bits round toward zero, all random bits away from zero (off the grid).
    down = FP8().round_stochastic(y, None, uniform=lambda _: torch.full_like(y, 1 - 2.0**-24))
    up = FP8().round_stochastic(y, None, uniform=lambda _: torch.zeros_like(y))
    assert torch.equal(run_codec(y, torch.zeros_like(random_bits))[2], down.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(run_codec(y, torch.full_like(random_bits, -1))[2], up.to(torch.float8_e4m3fn).view(torch.uint8))
    assert (up.abs() > y.abs())[~on_grid].all()


@pytest.fixture(scope="module")
def compiled_codec():
    signature = {
        "x_ptr": "*fp32", "r_ptr": "*i32", "nearest_ptr": "*u8", "decoded_ptr": "*fp32",
        "stochastic_ptr": "*u8", "n": "i32", "BLOCK": "constexpr",
    }
    aligned = [name for name in signature if name != "BLOCK"]
    return compile_builds([KernelBuild.of(_codec_kernel, signature, {"BLOCK": BLOCK}, aligned)])


@pytest.mark.parametrize("target", list(TARGETS))
def test_codec_kernel_compiles_for_the_target(compiled_codec, target):
    """Compiles (A100 included: no hardware FP8 needed), no spills, no local memory."""
    (result,) = [r for r in compiled_codec if r.target == target]
    assert result.error is None, result.error
    assert result.spill_bytes == 0 and result.local_bytes == 0 and result.stack_bytes == 0
    assert result.access_bits("x_ptr", "load") == {128}
    assert result.access_bits("decoded_ptr", "store") == {128}
    # No conversion instruction to or from FP8: the codec is integer and fp32 arithmetic only.
    assert "F2FP" not in result.sass_ops and "F2F" not in result.sass_ops, result.sass_ops
