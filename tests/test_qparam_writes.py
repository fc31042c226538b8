"""Writes into a quantized weight take effect in its codes, through any view (issue 14 item 3).

What is written is re-quantized with round-to-nearest, one scale group (row,
block, group, or whole matrix for tensor-wise INT4) at a time: the groups
whose values changed get the codes and scales that quantizing the new values
gives; every other group keeps its codes and scales bit for bit.
"""

import pytest
import torch
import torch.nn as nn

import eco

FORMATS = {"fp8-row": eco.FP8(), "fp8-block16": eco.FP8(block_size=16), "int4-g16": eco.INT4(group_size=16),
           "int4-tensor": eco.INT4()}


def quantized(shape, fmt, dtype=torch.float32):
    return eco.QuantizedTensor.from_float(torch.randn(shape, dtype=dtype), fmt)


def codes_of(qt):
    return qt.codes.view(torch.uint8).clone(), qt.scales.clone()


def expected_after(fmt, before: eco.QuantizedTensor, values: torch.Tensor):
    """Codes/scales: the groups whose values differ from ``before`` quantized from ``values``, the rest kept."""
    old = fmt.grouped(before.dequantize())
    changed = (fmt.grouped(values) != old).any(dim=1)
    new_codes, new_scales = fmt.quantize(values.float())
    groups = changed.numel()
    keep = ~changed.unsqueeze(1)
    codes = torch.where(keep, before.codes.view(torch.uint8).reshape(groups, -1),
                        new_codes.view(torch.uint8).reshape(groups, -1))
    scales = torch.where(keep, before.scales.reshape(groups, 1), new_scales.reshape(groups, 1))
    return codes.reshape(new_codes.shape), scales.reshape(new_scales.shape), changed


def assert_stored(qt, fmt, values, before):
    codes, scales, changed = expected_after(fmt, before, values)
    assert changed.any(), "the write changed nothing: the test would not see a dropped write"
    assert torch.equal(qt.codes.view(torch.uint8), codes)
    assert torch.equal(qt.scales, scales)


@pytest.mark.parametrize("name", list(FORMATS))
def test_setitem_of_one_element(name):
    fmt = FORMATS[name]
    w = quantized((4, 32), fmt)
    before = eco.QuantizedTensor(*codes_of(w), fmt, w.shape, w.dtype)
    values = w.dequantize()
    values[0, 0] = 5.0
    with torch.no_grad():
        w[0, 0] = 5.0
    assert_stored(w, fmt, values, before)
    assert w.dequantize()[0, 0] == 5.0  # the new absmax of its group is represented exactly


@pytest.mark.parametrize("name", list(FORMATS))
def test_zero_one_row_through_select(name):
    fmt = FORMATS[name]
    w = quantized((4, 32), fmt)
    before = eco.QuantizedTensor(*codes_of(w), fmt, w.shape, w.dtype)
    values = w.dequantize()
    values[1] = 0
    with torch.no_grad():
        w[1].zero_()
    assert_stored(w, fmt, values, before)
    assert not w.dequantize()[1].any()


@pytest.mark.parametrize("name", list(FORMATS))
def test_copy_into_one_expert_of_a_3d_tensor(name):
    fmt = FORMATS[name]
    w = quantized((3, 8, 32), fmt)
    before_codes, before_scales = codes_of(w)
    x = torch.randn(8, 32)
    with torch.no_grad():
        w[1].copy_(x)
    expected_codes, expected_scales = fmt.quantize(x)
    assert torch.equal(w.codes[1].view(torch.uint8), expected_codes.view(torch.uint8))
    assert torch.equal(w.scales[1], expected_scales)
    for e in (0, 2):  # the other experts are untouched
        assert torch.equal(w.codes[e].view(torch.uint8), before_codes[e]) and torch.equal(w.scales[e], before_scales[e])


def test_write_through_a_transposed_view_lands_in_the_right_elements():
    fmt = eco.FP8()
    w = quantized((4, 32), fmt)
    before = eco.QuantizedTensor(*codes_of(w), fmt, w.shape, w.dtype)
    values = w.dequantize()
    values[:, 3] = -1.5
    with torch.no_grad():
        w.t()[3].fill_(-1.5)
    assert_stored(w, fmt, values, before)


def test_groups_not_written_keep_codes_that_rounding_again_would_change():
    """A group whose codes do not reach rho (as after stochastic-rounding steps) is not re-rounded."""
    fmt = eco.INT4(group_size=16)
    w = quantized((2, 32), fmt)
    with torch.no_grad():
        w.scales[1, 0] *= 3  # row 1, group 0 now spans a third of the grid: re-quantizing it would change it
    codes, scales = codes_of(w)
    with torch.no_grad():
        w[0, 0] = 2.0
    assert torch.equal(w.codes[1].view(torch.uint8), codes[1]) and torch.equal(w.scales[1], scales[1])
    assert not torch.equal(w.codes[0].view(torch.uint8), codes[0])


def test_data_assignment():
    fmt = eco.INT4(group_size=16)
    lin = eco.quantize_(nn.Linear(32, 8), fmt)
    t = torch.randn(8, 32)
    lin.weight.data = t
    assert torch.equal(lin.weight.codes, fmt.quantize(t)[0])
    other = eco.QuantizedTensor.from_float(torch.randn(8, 32), fmt)
    lin.weight.data = other  # a quantized tensor of the same format is shared, as torch shares storage
    assert lin.weight.codes is other.codes and isinstance(lin.weight, nn.Parameter)
    with pytest.raises(ValueError, match="keeps its shape"):
        lin.weight.data = torch.randn(4, 32)


def test_foreach_ops_write_the_codes():
    fmt = eco.FP8()
    w = nn.Parameter(quantized((4, 32), fmt))
    ema = quantized((4, 32), fmt)
    expected = torch.lerp(ema.dequantize(), w.dequantize(), 0.25)
    with torch.no_grad():
        torch._foreach_lerp_([ema], [w], 0.25)  # timm-style EMA
        torch._foreach_mul_([w], 0.0)
    assert not w.dequantize().any()
    assert torch.equal(ema.codes.view(torch.uint8), fmt.quantize(expected)[0].view(torch.uint8))


def test_vector_to_parameters():
    fmt = eco.INT4(group_size=16)
    model = eco.quantize_(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 32, bias=False)), fmt)
    vec = torch.randn(sum(p.numel() for p in model.parameters()))
    nn.utils.vector_to_parameters(vec, model.parameters())
    w0 = vec[:16 * 32].view(16, 32)
    assert torch.equal(model[0].weight.codes, fmt.quantize(w0)[0])
    torch.testing.assert_close(model[0].bias.detach(), vec[16 * 32:16 * 33])
    back = nn.utils.parameters_to_vector(model.parameters())
    assert back.shape == vec.shape
    torch.testing.assert_close(back[16 * 32:16 * 33], vec[16 * 32:16 * 33])


def test_nan_write_through_a_view_raises_and_changes_nothing():
    w = quantized((4, 32), eco.FP8())
    codes, scales = codes_of(w)
    with pytest.raises(ValueError, match="NaN or inf"), torch.no_grad():
        w[2].fill_(float("nan"))
    assert torch.equal(w.codes.view(torch.uint8), codes) and torch.equal(w.scales, scales)


def test_writing_into_an_index_copy_raises():
    """``w[ids]`` is a copy in PyTorch; ours reads the weight's codes lazily, so a write would be lost: it raises."""
    w = quantized((3, 8, 32), eco.INT4())
    codes, _ = codes_of(w)
    picked = w[torch.tensor([0, 2])]
    with pytest.raises(RuntimeError, match="cannot be written to"), torch.no_grad():
        picked.zero_()
    assert torch.equal(w.codes.view(torch.uint8), codes)
    copy = picked.clone()  # a real copy can be written
    with torch.no_grad():
        copy.zero_()
    assert not copy.dequantize().any() and torch.equal(w.codes.view(torch.uint8), codes)


def test_index_put_on_the_weight_itself():
    fmt = eco.FP8()
    w = quantized((3, 8, 32), fmt)
    x = torch.randn(8, 32)
    with torch.no_grad():
        w[torch.tensor([2])] = x
    assert torch.equal(w.codes[2].view(torch.uint8), fmt.quantize(x)[0].view(torch.uint8))


def test_copy_of_quantized_row_chunks_into_a_tensor_wise_matrix_is_exact_in_any_order():
    """DCP loads a checkpoint saved with another sharding chunk by chunk into row ranges (FSDP2)."""
    fmt = eco.INT4()
    saved = quantized((6, 32), fmt)
    for order in ((0, 1, 2), (2, 0, 1)):
        target = quantized((6, 32), fmt)
        chunks = saved.split(2)
        with torch.no_grad():
            for i in order:
                target[2 * i:2 * i + 2].copy_(chunks[i])
        assert torch.equal(target.codes, saved.codes) and torch.equal(target.scales, saved.scales)


def test_a_view_to_the_same_shape_is_the_tensor_itself():
    """``view(same shape)`` (DTensor.to_local) records nothing: a copy of it is still quantized."""
    w = quantized((4, 32), eco.FP8())
    same = w.view(4, 32)
    assert isinstance(same, eco.QuantizedTensor) and not same._post and same.codes is w.codes
    assert isinstance(same.clone(), eco.QuantizedTensor)
    with torch.no_grad():
        same.zero_()
    assert not w.dequantize().any()


def test_a_write_into_one_expert_dequantizes_only_that_expert(monkeypatch):
    fmt = eco.INT4(group_size=16)
    w = quantized((4, 8, 32), fmt)
    before = eco.QuantizedTensor(*codes_of(w), fmt, w.shape, w.dtype)
    values = w.dequantize()
    values[2][:, 0] = 1.0
    shapes = []
    original = eco.qparam._dequantize
    monkeypatch.setattr(eco.qparam, "_dequantize", lambda *a: (shapes.append(tuple(a[3])), original(*a))[1])
    with torch.no_grad():
        w[2].t()[0].fill_(1.0)
    assert shapes and set(shapes) == {(8, 32)}
    monkeypatch.undo()
    assert_stored(w, fmt, values, before)
