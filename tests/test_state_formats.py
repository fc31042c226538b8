"""Optimizer-state formats (``eco.states``): unbiased stochastic storage, layout, state_dict, plain parameters."""

import copy

import pytest
import torch
import torch.nn as nn

import eco
from eco import reference, rng, states
from tests.helpers import assert_bits_equal, assert_same_training_state, mlp

N = 400  # seeds averaged


def stored(fmt, x, seed):
    tensors = fmt.allocate(x.shape, "cpu")
    fmt.store_(tensors, x, rng.key(seed))
    return fmt.load(tensors).double()


@pytest.mark.parametrize("fmt", [states.BF16_STATE, states.INT8_STATE, states.FP8_M_STATE, states.FP8_V_STATE],
                         ids=lambda f: f"{f.name}-{getattr(f, 'kind', '')}")
def test_stochastic_storage_is_unbiased(fmt):
    """The mean of many stored copies approaches the value (v: the value itself, not its square root), for
    values spread over decades inside one block: in total (|Z| < 5) and per value (4 standard deviations, or
    a few grid steps / N where every draw rounded the same way)."""
    x = torch.logspace(-6, 0, 256, dtype=torch.float64).float().reshape(2, 128)
    if fmt is not states.FP8_V_STATE:
        x = x * torch.tensor([1.0, -1.0]).repeat(64)
    draws = torch.stack([stored(fmt, x, seed) for seed in range(N)])
    error, sd, exact = draws.mean(0) - x.double(), draws.std(0), x.double()
    assert abs(error.sum() / (sd.square().sum() / N).sqrt()) < 5
    grid_step = torch.maximum(exact.abs() / 4, exact.abs().amax(dim=1, keepdim=True) / 127)  # a bound, any format
    assert (error.abs() <= 4 * sd / N**0.5 + 4 * grid_step / N).all()


def test_a_positive_v_never_stores_zero_and_values_saturate():
    v = torch.tensor([[1.0, 1e-30, 0.0] + [0.0] * 125])
    for seed in range(20):
        out = stored(states.FP8_V_STATE, v, seed)
        assert out[0, 1] > 0 and out[0, 2] == 0 and out[0, 0] == 1.0
    huge = torch.full((1, 4), reference.SATURATION)
    for fmt in (states.BF16_STATE, states.INT8_STATE, states.FP8_M_STATE, states.FP8_V_STATE):
        assert torch.isfinite(stored(fmt, huge, 1)).all()
        assert (stored(fmt, -huge if fmt is not states.FP8_V_STATE else huge, 2).abs() <= reference.SATURATION).all()


def test_bf16_stochastic_rounding_on_the_bits():
    """Up with probability (dropped 16 bits) / 2**16, for either sign; never past the largest bf16."""
    x = torch.tensor([1.0 + 2**-9, -(1.0 + 2**-9), 3.3895313892515355e38])  # 1 + 1/4 ulp of bf16 at 1
    low16 = torch.tensor([0, 0xBFFF, 0xC000, 0xFFFF])
    out = torch.stack([states.round_bf16_stochastic(x, torch.full_like(x, r, dtype=torch.int32)) for r in low16])
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0 + 2**-7, 1.0 + 2**-7]  # up iff r >= 2**16 - 2**14
    assert out[:, 1].tolist() == [-1.0, -1.0, -(1.0 + 2**-7), -(1.0 + 2**-7)]
    assert torch.isfinite(out[:, 2]).all()
    assert torch.equal(out.bfloat16().float(), out)  # exactly bf16 values


def test_factored_second_moment_is_exact_for_a_rank_one_gradient_square():
    """g*g = a_i b_j: the row/col/mean EMAs reconstruct v exactly (up to rounding); 1-D keeps a full v."""
    shape = (6, 10)
    a, b = torch.rand(6) + 0.5, torch.rand(10) + 0.5
    g = (a[:, None] * b[None, :]).sqrt()
    fmt = states.FACTORED_STATE
    v = reference.Moment(fmt, fmt.allocate(shape, "cpu"))
    m = reference.Moment(states.FP32_STATE, (torch.zeros(shape),))
    p = torch.zeros(shape)
    k = reference.adamw_scalars(lr=0.0, beta1=0.9, beta2=0.5, eps=1e-8, weight_decay=0.0, step=1)
    for _ in range(3):
        reference.plain_adamw_step_(p, g, m, v, scalars=k, seed=3)
    row, col, mean = v.tensors
    rebuilt = row[:, None] * (col / mean)[None, :]
    expected = (g * g) * (1 - 0.5**3)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-4, atol=0)
    assert states.for_shape(fmt, (7,)) is states.FP32_STATE


def _trained(fmt, **kwargs):
    model = eco.quantize_(mlp(), fmt) if fmt is not None else mlp()
    opt = eco.AdamW(model.parameters(), lr=1e-2, seed=0, **kwargs)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 16, generator=gen)), torch.randn(8, 4, generator=gen)).backward()
        opt.step()
    return model, opt


FORMATS = [dict(momentum="int8", second_moment="factored"), dict(momentum="fp8", second_moment="fp8"),
           dict(momentum="bf16", second_moment="bf16"), dict(momentum="fp32", second_moment="factored")]


@pytest.mark.parametrize("kwargs", FORMATS, ids=lambda k: f"{k['momentum']}-{k['second_moment']}")
def test_state_dict_round_trips_bit_identically_and_resumes(kwargs):
    model, opt = _trained(eco.INT4(group_size=16), **kwargs)
    sd = copy.deepcopy(opt.state_dict())
    fresh = eco.AdamW(model.parameters(), lr=1e-2, seed=5, **kwargs)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert_bits_equal(fresh.state[p][key], value, key)
    twin = copy.deepcopy((model, opt))
    for m, o in ((model, opt), twin):
        o.zero_grad()
        nn.functional.mse_loss(m(torch.ones(8, 16)), torch.zeros(8, 4)).backward()
    fresh.step()
    twin[1].step()
    assert_same_training_state(twin[0], twin[1], model, fresh)


@pytest.mark.parametrize("saved, loaded", [
    (dict(momentum="int8", second_moment="factored"), dict(momentum="fp32", second_moment="factored")),
    (dict(momentum="int8", second_moment="fp8"), dict(momentum="fp8", second_moment="fp8")),
    (dict(momentum="bf16", second_moment="factored"), dict(momentum="bf16", second_moment="bf16")),
    (dict(momentum="fp32", second_moment="fp32"), dict(momentum="fp32", second_moment="bf16")),
])
def test_a_state_of_another_format_is_refused(saved, loaded):
    model, opt = _trained(eco.FP8(), **saved)
    other = eco.AdamW(model.parameters(), **loaded)
    with pytest.raises(ValueError, match="does not keep|lacks|converting would round"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_plain_parameters_get_the_state_formats_and_the_options_read_in_one_line():
    model, opt = _trained(None, momentum="8bit", second_moment="factored")
    weight, bias = model[0].weight, model[0].bias
    assert opt.state[weight]["exp_avg"].dtype == torch.int8 and "exp_avg_scale" in opt.state[weight]
    assert set(opt.state[weight]) >= {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq_mean"}
    assert opt.state[bias]["exp_avg_sq"].dtype == torch.float32  # 1-D: a full v
    sgd = eco.SGD(model.parameters(), momentum=0.9, momentum_state="fp8")
    assert sgd.state_formats["momentum_buffer"] is states.FP8_M_STATE
    assert eco.AdamW(model.parameters(), state_dtype=torch.bfloat16).state_formats["exp_avg_sq"] is states.BF16_STATE
    with pytest.raises(ValueError, match="either state_dtype or"):
        eco.AdamW(model.parameters(), state_dtype=torch.bfloat16, momentum="int8")
    with pytest.raises(ValueError, match="second_moment must be one of"):
        eco.AdamW(model.parameters(), second_moment="int8")


def test_bytes_per_element_are_what_the_formats_allocate():
    """``StateFormat.nbytes`` (the one count of a state's bytes; ``eco.kernels.traffic`` uses it) is the bytes
    of the tensors ``allocate`` makes, and the "bytes per element" column of ``eco.states``' table is it."""
    import re

    by_row = {('"fp32"', ""): states.FP32_STATE, ('"bf16"', ""): states.BF16_STATE,
              ('"int8"', "(m)"): states.INT8_STATE, ('"fp8"', "(m)"): states.FP8_M_STATE,
              ('"fp8"', "(v)"): states.FP8_V_STATE, ('"factored"', ""): states.FACTORED_STATE}
    row = re.compile(r'^``("\w+")``\s*(\([mv]\))?\s{2,}.*?\s{2,}(\S[^\n]*?)\s*$', re.M)
    table = {(name, moment): expression for name, moment, expression in row.findall(states.__doc__)}
    assert set(table) == set(by_row)
    R, C = 96, 384  # noqa: N806 -- the names of the table
    for key, fmt in by_row.items():
        product = re.sub(r"([\w)])\s+(?=[\w(])", r"\1 * ", table[key])  # "4 (R + C + 1) / (R C)": implicit *
        expected = eval(product, {"R": R, "C": C})  # noqa: S307 -- the module's own docstring
        assert fmt.nbytes((R, C)) == pytest.approx(expected * R * C), key
    for fmt in by_row.values():
        for shape in [(R, C), (3, 5, 130), (7,), (300,), ()]:
            if isinstance(fmt, states.Factored) and len(shape) < 2:
                continue
            allocated = sum(t.untyped_storage().nbytes() for t in fmt.allocate(shape, "cpu"))
            assert fmt.nbytes(shape) == allocated, (fmt.name, shape)
