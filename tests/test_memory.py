"""Bytes per parameter measured from live tensors by eco.memory_report."""

import pytest
import torch
import torch.nn as nn

import eco


def linear_stack(width=512, depth=4):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])  # 1,048,576 params


def report_after_one_step(fmt, **opt_kwargs):
    model = linear_stack()
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    if fmt is not None:
        eco.quantize_(model, fmt)
    opt = eco.AdamW(model.parameters(), **opt_kwargs)
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.zero_grad()
    return eco.memory_report(model, opt)


def test_fp8_row_with_bf16_states_is_at_most_5_1_bytes_per_param():
    report = report_after_one_step(eco.FP8(), state_dtype=torch.bfloat16)
    assert report.bytes_per_param <= 5.1, str(report)
    assert report.per_param("weight codes") == pytest.approx(1.0)
    assert report.per_param("momentum (m)") == pytest.approx(2.0)
    assert report.per_param("second moment (v)") == pytest.approx(2.0)


def test_int4_group128_with_bf16_states_is_at_most_4_6_bytes_per_param():
    report = report_after_one_step(eco.INT4(group_size=128), state_dtype=torch.bfloat16)
    assert report.bytes_per_param <= 4.6, str(report)
    assert report.per_param("weight codes") == pytest.approx(0.5)
    assert report.per_param("weight scales") == pytest.approx(4 / 128)


def test_master_weights_add_four_bytes_per_param():
    eco_only = report_after_one_step(eco.FP8(), state_dtype=torch.bfloat16)
    with_master = report_after_one_step(eco.FP8(), state_dtype=torch.bfloat16, master_weights=True)
    assert with_master.per_param("master weights") == pytest.approx(4.0)
    assert with_master.bytes_per_param - eco_only.bytes_per_param == pytest.approx(4.0)


def test_fp32_baseline_and_report_text():
    report = report_after_one_step(None)
    assert report.bytes_per_param == pytest.approx(12.0)  # fp32 weights + fp32 m and v
    text = str(report)
    assert "unquantized params" in text and "bytes/param" in text and "1,048,576" in text


def test_each_storage_is_counted_once():
    model = linear_stack(width=64, depth=2)
    model[1].weight = model[0].weight  # tied
    report = eco.memory_report(model)
    assert report.total_bytes == 64 * 64 * 4


def test_wrapper_subclass_states_count_their_inner_tensors():
    # Peers such as torchao keep low-bit states in wrapper subclasses, which own no storage themselves.
    from torch.testing._internal.two_tensor import TwoTensor

    model = linear_stack(width=64, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[0].weight
    codes = torch.zeros(64, 64, dtype=torch.uint8)
    opt.state[weight]["exp_avg"] = TwoTensor(codes, codes.clone())
    report = eco.memory_report(model, opt)
    assert report.bytes_by_kind["momentum (m)"] == 2 * 64 * 64


@pytest.mark.parametrize("fmt, states, limit", [
    (eco.INT4(group_size=128), dict(momentum="8bit", second_moment="factored"), 1.6),
    (eco.FP8(), dict(momentum="8bit", second_moment="factored"), 2.1),
    (eco.FP8(), dict(momentum="8bit", second_moment="8bit"), 3.1),
])
def test_8bit_momentum_and_factored_or_8bit_second_moment_fit_the_budget(fmt, states, limit):
    """Issue 16's acceptance: 4 x Linear(512, 512) after one step, every byte counted from live tensors."""
    report = report_after_one_step(fmt, **states)
    assert report.bytes_per_param <= limit, str(report)
    assert report.per_param("momentum (m)") == pytest.approx(1.0)
    assert report.per_param("momentum scales") == pytest.approx(4 / 128)
    if states["second_moment"] == "factored":
        assert report.per_param("second moment (factored)") == pytest.approx(4 * (512 + 512 + 1) / 512**2)
        assert report.per_param("second moment (v)") == 0
    else:
        assert report.per_param("second moment (v)") == pytest.approx(1.0)
        assert report.per_param("second moment scales") == pytest.approx(4 / 128)
    text = str(report)
    assert "momentum scales" in text and "second moment" in text
