"""Quantizers: shapes, zero groups, RTN idempotence and error bound, SR unbiasedness, INT4 packing."""

import math

import pytest
import torch

import eco
from eco.formats import ROUNDINGS, pack_int4, unpack_int4
from tests.helpers import FORMATS


def _step_size_bound(fmt, x, scales):
    """Half the local grid spacing, per element: the RTN error bound."""
    deq_scale = fmt.grouped(torch.ones_like(x)) * scales.reshape(-1, 1)
    deq_scale = deq_scale.reshape(x.shape)
    if isinstance(fmt, eco.INT4):
        return 0.5 * deq_scale
    # E4M3: spacing 2**(floor(log2|y|) - 3), at least 2**-9, in units of the scale
    y = (x.abs() / deq_scale).clamp(min=2.0**-6)
    spacing = torch.exp2(torch.floor(torch.log2(y)) - 3)
    return 0.5 * spacing * deq_scale


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 64)])
def test_nearest_is_idempotent_and_within_half_a_step(name, shape):
    fmt = FORMATS[name]
    x = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])
    codes, scales = fmt.quantize(x, "nearest")
    deq = fmt.dequantize(codes, scales, x.shape)
    codes2, scales2 = fmt.quantize(deq, "nearest")
    assert torch.equal(codes2.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(scales2, scales)
    err = (deq - x).abs()
    bound = _step_size_bound(fmt, x, scales)
    assert (err <= bound * (1 + 1e-6)).all(), float((err / bound).max())
    assert scales.shape == fmt.scale_shape(x.shape)


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_rounding_is_unbiased(name):
    fmt = FORMATS[name]
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    x[0, 0] = 3.0  # fix the absmax so every draw shares the scales
    x = x.clamp(-3, 3)
    n = 4000
    g = torch.Generator().manual_seed(123)
    total = torch.zeros_like(x, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for _ in range(n):
        codes, scales = fmt.quantize(x, "stochastic", g)
        deq = fmt.dequantize(codes, scales, x.shape).double()
        total += deq
        total_sq += deq * deq
    mean = total / n
    var = (total_sq / n - mean**2).clamp(min=0)
    # Each element's mean has standard error sqrt(var/n); allow 5 sigma. An element with a
    # rounding probability p < 1/n may never move in n draws, so the variance is floored at
    # that of p = 1/n: step**2 / n, with step the local grid spacing.
    step = 2 * _step_size_bound(fmt, x, fmt.quantize(x)[1]).double()
    tol = 5 * torch.sqrt(torch.maximum(var, step**2 / n) / n) + 1e-6 * x.abs().max()
    assert ((mean - x.double()).abs() <= tol).all(), float(((mean - x.double()).abs() / tol).max())
    # And it really is random: some elements land on two different grid points.
    assert (var > 0).float().mean() > 0.5


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_rounding_reproducible_with_a_seed(name):
    fmt = FORMATS[name]
    x = torch.randn(6, 64)
    a = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(7))
    b = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(7))
    c = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(8))
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert not torch.equal(a[0].view(torch.uint8), c[0].view(torch.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_all_zero_groups_do_not_divide_by_zero(name):
    fmt = FORMATS[name]
    x = torch.zeros(4, 64)
    x[1, :] = torch.randn(64)
    for rounding in ROUNDINGS:
        codes, scales = fmt.quantize(x, rounding, torch.Generator().manual_seed(0))
        deq = fmt.dequantize(codes, scales, x.shape)
        assert torch.isfinite(scales).all() and torch.isfinite(deq).all()
        assert (deq[x == 0] == 0).all()


def test_int4_packing_round_trips_including_odd_width():
    values = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(unpack_int4(packed, 7), values)


def test_int4_codes_are_two_per_byte_and_in_range():
    fmt = eco.INT4(group_size=64)
    codes, scales = fmt.quantize(torch.randn(3, 128) * 10)
    assert codes.shape == (3, 64) and codes.dtype == torch.uint8
    grid = unpack_int4(codes, 128)
    assert grid.min() >= -7 and grid.max() <= 7
    assert scales.shape == (3, 2)


def test_fp8_scale_maps_absmax_to_448():
    x = torch.randn(5, 32)
    codes, scales = eco.FP8().quantize(x)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((5,), 448.0))


def test_group_size_must_divide_the_row():
    with pytest.raises(ValueError, match="multiple of the group size 128"):
        eco.INT4(group_size=128).quantize(torch.randn(4, 200))
    with pytest.raises(ValueError, match="multiple of the group size"):
        eco.FP8(block_size=128).quantize(torch.randn(4, 100))
    with pytest.raises(ValueError, match="positive even int"):
        eco.INT4(group_size=7)
    with pytest.raises(ValueError, match="1-D"):
        eco.FP8().quantize(torch.randn(10))


def test_tensorwise_int4_has_one_scale_per_matrix():
    fmt = eco.INT4()
    x = torch.randn(3, 4, 8)
    x[1] *= 100
    _, scales = fmt.quantize(x)
    assert scales.shape == (3, 1, 1)
    assert scales[1] > 50 * scales[0]



@pytest.mark.parametrize("fmt", [eco.FP8(), eco.FP8(group_size=32), eco.INT4(), eco.INT4(group_size=32)], ids=str)
@pytest.mark.parametrize("shape", [(4, 300, 1024), (2100, 512), (3, 5, 300_000)])
def test_dequantize_in_pieces_gives_the_same_bits_with_bounded_temporaries(fmt, shape, monkeypatch):
    """The reference dequantizes piece by piece (whole matrices, or rows inside one): same bits as one expression."""
    from eco import reference

    codes, scales = fmt.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    dtypes = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    whole = {dtype: fmt.dequantize(codes, scales, shape, dtype) for dtype in dtypes}
    sizes = []
    one_expression = type(fmt).dequantize

    def recording(self, codes, scales, shape, dtype=torch.float32):
        sizes.append(math.prod(shape))
        return one_expression(self, codes, scales, shape, dtype)

    monkeypatch.setattr(type(fmt), "dequantize", recording)
    for dtype, bits in dtypes.items():
        sizes.clear()
        out = reference.dequantize(codes, scales, fmt, shape, dtype)
        assert torch.equal(out.view(bits), whole[dtype].view(bits))
        assert len(sizes) > 1 and max(sizes) <= max(reference.PIECE_ELEMENTS, shape[-1])  # at least one row
