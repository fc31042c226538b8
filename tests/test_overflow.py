"""Nothing lost to overflow (issue 14, items 1 and 2): a step either completes with finite values or changes nothing.

The reasoning is in ``eco/reference.py``'s module docstring (and docs/design.md,
"The step"): gradients are checked against
``GRAD_LIMIT`` in the optimizer's pre-step reduction, the coefficients on the
host (``check_scalars``), and every value the step computes from inputs that
pass is finite by construction (three saturating ``min``/``clamp``).
"""

import warnings

import pytest
import torch
import torch.nn as nn

import eco
from eco import compiled, reference, rng, states
from tests.helpers import FORMATS

BACKENDS = ["reference", "compiled"]


def codes_and_scales(lin):
    return lin.weight.codes.view(torch.uint8).clone(), lin.weight.scales.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [eco.INT4(), eco.FP8()], ids=str)
def test_one_huge_finite_gradient_changes_nothing_and_training_goes_on(fmt, backend):
    """The issue's repro: |g| = 1e20 once (g*g overflows fp32). Today the next step writes every code as 0."""
    torch.manual_seed(0)
    lin = eco.quantize_(nn.Linear(16, 8, bias=False), fmt)
    opt = eco.AdamW(lin.parameters(), lr=1e-3, weight_decay=0.0, backend=backend, seed=0)
    lin.weight.grad = torch.randn(8, 16) * 1e-2
    opt.step()
    before = codes_and_scales(lin)
    state_before = {k: v.clone() for k, v in opt.state[lin.weight].items() if isinstance(v, torch.Tensor)}
    g = torch.randn(8, 16) * 1e-2
    g[0, 0] = 1e20
    lin.weight.grad = g
    with pytest.warns(RuntimeWarning, match="2\\*\\*63"):
        opt.step()
    assert opt.skipped_steps == 1
    after = codes_and_scales(lin)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    for k, v in state_before.items():
        assert torch.equal(opt.state[lin.weight][k], v), k
    lin.weight.grad = torch.randn(8, 16) * 1e-2
    opt.step()
    values = lin.weight.dequantize()
    assert torch.isfinite(values).all() and (values != 0).float().mean() > 0.5
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        lin.weight.grad = g
        eco.AdamW(lin.parameters(), nonfinite="raise", backend=backend).step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_cls", [eco.AdamW, eco.SGD])
def test_a_tiny_learning_rate_changes_nothing(opt_cls, backend):
    """lr = 1e-41 (an ExponentialLR left running): today inject = inf, inf * 0 = NaN lands in every m."""
    torch.manual_seed(0)
    model = eco.quantize_(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), eco.INT4(group_size=16))
    opt = opt_cls(model.parameters(), lr=1e-2, backend=backend, seed=0)
    x = torch.randn(8, 16)
    model(x).square().mean().backward()
    opt.step()
    before = [codes_and_scales(m) for m in model]
    for group in opt.param_groups:
        group["lr"] = 1e-41
    with pytest.warns(RuntimeWarning, match="learning rate"):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert opt.skipped_steps == 3
    for m, (c, s) in zip(model, before, strict=True):
        assert torch.equal(m.weight.codes.view(torch.uint8), c) and torch.equal(m.weight.scales, s)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v.float()).all()


def test_small_but_representable_learning_rates_still_step():
    """Down to the documented floor (|inject| <= 2**62) the step runs; below it the policy applies."""
    torch.manual_seed(0)
    lin = eco.quantize_(nn.Linear(16, 8, bias=False), eco.FP8())
    opt = eco.AdamW(lin.parameters(), lr=1e-19, weight_decay=0.0)
    lin.weight.grad = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.skipped_steps == 0
    assert reference.check_scalars(reference.adamw_scalars(lr=1e-19, beta1=0.9, beta2=0.999, eps=1e-8,
                                                           weight_decay=0.0, step=1000)) is None
    assert "too small" in reference.check_scalars(reference.adamw_scalars(lr=1e-21, beta1=0.9, beta2=0.999,
                                                                          eps=1e-8, weight_decay=0.0, step=1000))
    assert "too small" in reference.check_scalars(reference.sgd_scalars(lr=1e-21, momentum=0.9, weight_decay=0.0))


def _extreme_state(fmt, shape, gen):
    """Every input at the edge the checks allow: |g| just below 2**63, |m| at the saturation, v huge or 0,
    weights up to 2**126 and tiny, mixed in every group."""
    g = (torch.randn(shape, generator=gen) * torch.tensor([1e-30, 1.0, 9e18, 0.0]).repeat(shape[-1] // 4)).clamp(
        -9.2e18, 9.2e18)
    m = torch.randn(shape, generator=gen).sign() * torch.tensor([reference.SATURATION, 1e-30, 1.0, 0.0]).repeat(
        shape[-1] // 4)
    v = torch.tensor([reference.SATURATION, 0.0, 1e-30, 1.0]).repeat(shape[-1] // 4).expand(shape).clone()
    w = torch.randn(shape, generator=gen) * torch.tensor([2.0**120, 1e-20, 1.0, 3.0]).repeat(shape[-1] // 4)
    codes, scales = fmt.quantize(w)
    return codes, scales, g, m, v


@pytest.mark.parametrize("backend", [reference, compiled], ids=["reference", "compiled"])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("lr, eps", [(1e-19, 1e-8), (1e3, 1e-38), (1e-3, 2.0**63)])
def test_extreme_inputs_within_the_checks_give_finite_results(name, lr, eps, backend):
    """Inputs at every edge the checks allow: codes, scales and states stay finite (no inf * 0, no inf - inf)."""
    fmt = FORMATS[name]
    shape = torch.Size((4, 64))
    for m_name, v_name in (("fp32", "fp32"), ("bf16", "fp8"), ("int8", "factored")):
        codes, scales, g, m0, v0 = _extreme_state(fmt, shape, torch.Generator().manual_seed(0))
        m_fmt, v_fmt = states.momentum_format(m_name), states.second_moment_format(v_name)
        m, v = (reference.Moment(f, f.allocate(shape, "cpu")) for f in (m_fmt, v_fmt))
        m_fmt.store_(m.tensors, m0, rng.key(1))
        if v_name != "factored":
            v_fmt.store_(v.tensors, v0, rng.key(2))
        for step in (1, 2, 3):
            scalars = reference.adamw_scalars(lr=lr, beta1=0.9, beta2=0.999, eps=eps, weight_decay=0.0, step=step)
            assert reference.check_scalars(scalars) is None
            backend.adamw_step_(codes, scales, g, m, v, None, fmt=fmt, shape=shape, scalars=scalars,
                                rounding="stochastic", seed=step)
            assert torch.isfinite(fmt.dequantize(codes, scales, shape)).all(), (m_name, step)
            for t in m.tensors + v.tensors:
                assert torch.isfinite(t.float()).all(), (m_name, v_name, step)
            assert (m_fmt.load(m.tensors).abs() <= reference.SATURATION).all()


def test_a_nan_absmax_is_never_a_zero_group():
    for fmt in (eco.FP8(), eco.INT4(group_size=32)):
        scale, inv_scale = fmt.scale_pair(torch.tensor([[float("nan")], [0.0], [1.0]]))
        assert torch.isnan(scale[0]) and torch.isnan(inv_scale[0])  # propagates: never scale 1 / inverse 0
        assert scale[1] == 1 and inv_scale[1] == 0


@pytest.mark.parametrize("key, bad", [("exp_avg", float("nan")), ("exp_avg_sq", float("inf"))])
def test_a_saved_state_with_nan_or_inf_is_refused(key, bad):
    lin = eco.quantize_(nn.Linear(16, 8, bias=False), eco.INT4())
    opt = eco.AdamW(lin.parameters())
    lin.weight.grad = torch.randn(8, 16)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0][key] = sd["state"][0][key].clone()
    sd["state"][0][key][0, 0] = bad
    fresh = eco.AdamW(lin.parameters())
    with pytest.raises(ValueError, match="NaN or inf"):
        fresh.load_state_dict(sd)
    assert not fresh.state
