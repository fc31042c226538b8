"""One optimizer step on a quantized weight equals the formulas of docs/method.md, computed here independently."""

import pytest
import torch

import eco
from tests.helpers import FORMATS

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.98, 1e-8, 0.1


def independent_rtn(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest absmax quantization written from the method page; returns (grid values, scale per element)."""
    if isinstance(fmt, eco.INT4) and fmt.group_size is None:
        groups = x.reshape(-1, x.shape[-2] * x.shape[-1])
    else:
        groups = x.reshape(-1, fmt.group_size or x.shape[-1])
    rho = 448.0 if isinstance(fmt, eco.FP8) else 7.0
    absmax = groups.abs().amax(dim=1, keepdim=True)
    y = groups * (rho / absmax)
    grid = y.to(torch.float8_e4m3fn).float() if isinstance(fmt, eco.FP8) else torch.round(y)
    scale = (absmax / rho).expand_as(groups)
    return grid.reshape(x.shape), scale.reshape(x.shape)


def quantized_param(fmt, shape=(6, 64)):
    w0 = torch.randn(shape)
    return torch.nn.Parameter(eco.QuantizedTensor.from_float(w0, fmt))


@pytest.mark.parametrize("name", FORMATS)
def test_one_adamw_step_matches_algorithm_3(name):
    fmt = FORMATS[name]
    p = quantized_param(fmt)
    opt = eco.AdamW([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, rounding="nearest")
    w = p.dequantize().clone()
    g = torch.randn(p.shape)
    # Two steps, so that m and v start non-zero in the step we check.
    for _ in range(2):
        st = opt.state.get(p)
        m = st["exp_avg"].clone() if st else torch.zeros(p.shape)
        v = st["exp_avg_sq"].clone() if st else torch.zeros(p.shape)
        t = st["step"] + 1 if st else 1
        w = p.dequantize().clone()
        p.grad = g = torch.randn(p.shape)
        opt.step()

    m_t = B1 * m + (1 - B1) * g
    v_new = B2 * v + (1 - B2) * g * g
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    d = torch.sqrt(v_new / bc2) + EPS
    w_t = w * (1 - LR * WD) - (LR / bc1) * (m_t / d)
    grid, scale = independent_rtn(w_t, fmt)
    e = w_t - grid * scale
    m_new = m_t + (bc1 / LR) * (1 - 1 / B1) * d * e

    st = opt.state[p]
    assert torch.equal(fmt.decode(p.codes, p.shape), grid)
    torch.testing.assert_close(p.dequantize(), grid * scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"], v_new, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(st["exp_avg"], m_new, rtol=1e-5, atol=1e-6)
    assert (e != 0).any(), "the test must exercise a non-zero rounding error"


@pytest.mark.parametrize("name", FORMATS)
def test_one_sgd_step_matches_eqs_2_to_6(name):
    fmt = FORMATS[name]
    beta = 0.9
    p = quantized_param(fmt)
    opt = eco.SGD([p], lr=LR, momentum=beta, rounding="nearest")
    for _ in range(2):
        st = opt.state.get(p)
        m = st["momentum_buffer"].clone() if st else torch.zeros(p.shape)
        w = p.dequantize().clone()
        p.grad = g = torch.randn(p.shape)
        opt.step()
    m_t = beta * m + (1 - beta) * g
    w_t = w - LR * m_t
    grid, scale = independent_rtn(w_t, fmt)
    e = w_t - grid * scale
    m_new = m_t + (1 / LR) * (1 - 1 / beta) * e
    assert torch.equal(fmt.decode(p.codes, p.shape), grid)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m_new, rtol=1e-5, atol=1e-6)


def test_error_feedback_off_and_master_weights_inject_nothing():
    fmt = eco.FP8()
    for kwargs in ({"error_feedback": False}, {"master_weights": True}):
        p = quantized_param(fmt)
        opt = eco.SGD([p], lr=LR, momentum=0.9, rounding="nearest", **kwargs)
        p.grad = g = torch.randn(p.shape)
        opt.step()
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.1 * g)


def test_master_weights_keep_fp32_copy_and_requantize_from_it():
    fmt = eco.INT4(group_size=32)
    p = quantized_param(fmt)
    master0 = p.dequantize().clone()
    opt = eco.SGD([p], lr=1e-3, momentum=0.9, rounding="nearest", master_weights=True)
    p.grad = g = torch.randn(p.shape)
    opt.step()
    expected = master0 - 1e-3 * (0.1 * g)
    torch.testing.assert_close(opt.state[p]["master"], expected)
    grid, _ = independent_rtn(expected, fmt)
    assert torch.equal(fmt.decode(p.codes, p.shape), grid)


def test_decay_corrected_injection_scales_by_one_minus_lr_wd():
    fmt = eco.FP8()
    torch.manual_seed(3)
    results = {}
    for corrected in (False, True):
        torch.manual_seed(3)
        p = quantized_param(fmt)
        opt = eco.AdamW([p], lr=LR, weight_decay=WD, rounding="nearest", decay_corrected_injection=corrected)
        p.grad = torch.randn(p.shape)
        opt.step()
        results[corrected] = opt.state[p]["exp_avg"]
    m_t = 0.1 * p.grad
    torch.testing.assert_close(results[True] - m_t, (results[False] - m_t) * (1 - LR * WD), rtol=1e-5, atol=1e-7)


def _side_by_side(make_ours, make_theirs, steps=5):
    """Run an eco optimizer and a torch one on copies of one plain parameter with the same gradients."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = make_ours([a]), make_theirs([b])
    if "momentum" in theirs.defaults:
        theirs.state[b]["momentum_buffer"] = torch.zeros(5, 3)  # ours starts from zero
    for _ in range(steps):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    return a, b


def test_plain_parameters_get_plain_adamw():
    kwargs = dict(lr=1e-2, betas=(B1, B2), eps=EPS, weight_decay=WD)
    a, b = _side_by_side(lambda p: eco.AdamW(p, **kwargs), lambda p: torch.optim.AdamW(p, **kwargs))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plain_parameters_get_dampened_sgd():
    a, b = _side_by_side(lambda p: eco.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
