"""The Triton kernels (``eco.kernels``) against the reference (``eco.reference``), round-to-nearest.

On CPU these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernels on CUDA
tensors. Codes, scales, moments and master copies must be bit-identical: the
kernels evaluate the reference's expressions in the same order, and store
bf16 states rounded to nearest even like ``Tensor.copy_``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import eco
from eco import kernels, reference
from eco.formats import ZERO_GROUP_ABSMAX, format_from_config
from eco.kernels import eco_step, launcher, specs, traffic
from tests.helpers import assert_bits_equal, assert_same_training_state, bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ADAM = dict(lr=0.02, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)
SGD = dict(lr=0.05, momentum=0.9, weight_decay=0.01)

FORMATS = [format_from_config(c) for c in specs.format_configs()]
ROW_SHAPES = [(1, 1), (3, 5), (7, 130), (3, 4, 64), "zeros"]  # any last dim
GROUP_SHAPES = [(1, 128), (5, 256), (3, 4, 128), "zeros"]      # last dim a multiple of every group size


def shapes_for(fmt):
    """Every awkward shape for row/tensor formats and groups of 32; one 3-D shape for other group sizes."""
    if fmt.group_size is None:
        return ROW_SHAPES
    return GROUP_SHAPES if fmt.group_size == 32 else [(3, 4, 128)]


def case_id(fmt, shape):
    return f"{fmt}-{'x'.join(map(str, shape)) if shape != 'zeros' else 'zeros'}"


CASES = [(fmt, shape) for fmt in FORMATS for shape in shapes_for(fmt)]
CASE_IDS = [case_id(f, s) for f, s in CASES]


def make_state(fmt, shape, optimizer, state_dtype, grad_dtype, seed=0):
    """A quantized weight plus gradient and moments (non-trivial: moments and codes already moved)."""
    gen = torch.Generator().manual_seed(seed)
    zeros = shape == "zeros"
    shape = (7, 130) if zeros and fmt.group_size is None else ((3, 128) if zeros else shape)
    w = torch.zeros(shape) if zeros else torch.randn(shape, generator=gen)
    codes, scales = fmt.quantize(w)
    grad = torch.zeros(shape) if zeros else torch.randn(shape, generator=gen) * 0.1
    m = torch.randn(shape, generator=gen) * 0.01
    state = dict(codes=codes, scales=scales, grad=grad.to(grad_dtype), exp_avg=m.to(state_dtype))
    if optimizer == "adamw":
        state["exp_avg_sq"] = (torch.rand(shape, generator=gen) * 1e-3).to(state_dtype)
    return torch.Size(shape), {k: v.to(DEVICE) for k, v in state.items()}


def run_step(backend, optimizer, fmt, shape, state, step, rounding="nearest", seed=None, master=None):
    if optimizer == "adamw":
        scalars = reference.adamw_scalars(step=step, inject=True, **ADAM)
        backend.adamw_step_(state["codes"], state["scales"], state["grad"], state["exp_avg"], state["exp_avg_sq"],
                            master, fmt=fmt, shape=shape, scalars=scalars, rounding=rounding, seed=seed)
    else:
        scalars = reference.sgd_scalars(inject=True, **SGD)
        backend.sgd_step_(state["codes"], state["scales"], state["grad"], state["exp_avg"], master, fmt=fmt,
                          shape=shape, scalars=scalars, rounding=rounding, seed=seed)


def clone_state(state):
    return {k: v.clone() for k, v in state.items()}


def assert_states_equal(actual, expected):
    for key in expected:
        assert_bits_equal(actual[key], expected[key], key)


# ---------------------------------------------------------------- the step
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("fmt, shape", CASES, ids=CASE_IDS)
def test_step_matches_reference_bit_for_bit(fmt, shape, optimizer):
    """Three consecutive steps (bf16 gradient, fp32 states): every stored tensor bit-identical."""
    shape, state = make_state(fmt, shape, optimizer, torch.float32, torch.bfloat16)
    ref, ker = clone_state(state), clone_state(state)
    for step in (1, 2, 3):
        run_step(reference, optimizer, fmt, shape, ref, step)
        run_step(kernels, optimizer, fmt, shape, ker, step)
        assert_states_equal(ker, ref)
    assert not torch.equal(bits(ref["exp_avg"]), bits(state["exp_avg"]))  # the steps did something


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_step_bf16_states_and_fp32_grad(fmt, optimizer):
    """bf16 moments are stored rounded to nearest even exactly like the reference's copy_."""
    shape = (2, 3, 128)
    for state_dtype, grad_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float32)):
        shape_, state = make_state(fmt, shape, optimizer, state_dtype, grad_dtype, seed=1)
        ref, ker = clone_state(state), clone_state(state)
        for step in (1, 2):
            run_step(reference, optimizer, fmt, shape_, ref, step)
            run_step(kernels, optimizer, fmt, shape_, ker, step)
        assert_states_equal(ker, ref)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(group_size=32)], ids=str)
def test_step_with_master_weights(fmt, optimizer):
    """The master-weight baseline: the master copy becomes w~, codes are q(w~), nothing is injected."""
    shape, state = make_state(fmt, (3, 4, 128), optimizer, torch.float32, torch.bfloat16, seed=2)
    master = fmt.dequantize(state["codes"], state["scales"], shape) + 1e-3
    ref, ker = clone_state(state), clone_state(state)
    ref_master, ker_master = master.clone(), master.clone()
    run_step(reference, optimizer, fmt, shape, ref, 1, master=ref_master)
    run_step(kernels, optimizer, fmt, shape, ker, 1, master=ker_master)
    assert_states_equal(ker, ref)
    assert_bits_equal(ker_master, ref_master, "master")


@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(), eco.FP8(block_size=32)], ids=str)
def test_nonfinite_gradient_never_writes_nan_codes(fmt):
    """Called directly with NaN/inf gradients (the optimizer would have skipped), codes stay non-NaN."""
    shape, state = make_state(fmt, (3, 4, 128), "adamw", torch.float32, torch.float32, seed=3)
    state["grad"][0, 0, :5] = float("nan")
    state["grad"][1, 2, 7] = float("inf")
    state["grad"][2, 3, 9] = -float("inf")
    run_step(kernels, "adamw", fmt, shape, state, 1)
    values = fmt.decode(state["codes"], shape)
    assert not torch.isnan(values).any()
    # where the gradient was finite and the scale too, the update went through normally
    assert torch.isfinite(state["scales"][2 if fmt.group_size is None and fmt.name == "fp8" else 0]).all()


def test_lr_zero_updates_moments_only():
    """``update_weight=False`` (lr == 0): moments move, codes and scales do not (same as the reference)."""
    fmt = eco.FP8(block_size=32)
    shape, state = make_state(fmt, (3, 128), "adamw", torch.float32, torch.bfloat16, seed=4)
    ref, ker = clone_state(state), clone_state(state)
    scalars = reference.adamw_scalars(step=1, inject=True, **{**ADAM, "lr": 0.0})
    for backend, st in ((reference, ref), (kernels, ker)):
        backend.adamw_step_(st["codes"], st["scales"], st["grad"], st["exp_avg"], st["exp_avg_sq"], None, fmt=fmt,
                            shape=shape, scalars=scalars, rounding="nearest", seed=None, update_weight=False)
    assert_states_equal(ker, ref)
    assert_bits_equal(ker["codes"], state["codes"], "codes")


def test_unsupported_group_size_is_refused_with_a_clear_error():
    fmt = eco.FP8(block_size=16)
    assert not kernels.has_kernel(fmt)
    shape, state = make_state(fmt, (2, 32), "sgd", torch.float32, torch.float32)
    with pytest.raises(ValueError, match="no kernel for FP8"):
        run_step(kernels, "sgd", fmt, shape, state, 1)


# ---------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("fmt, shape", CASES, ids=CASE_IDS)
def test_quantize_and_dequantize_match_the_format(fmt, shape):
    shape = (7, 130) if shape == "zeros" and fmt.group_size is None else ((3, 128) if shape == "zeros" else shape)
    x = torch.randn(shape, device=DEVICE) * 3
    x.view(-1)[0] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        codes, scales = kernels.quantize(x.to(dtype), fmt)
        ref_codes, ref_scales = fmt.quantize(x.to(dtype))
        assert_bits_equal(codes, ref_codes, "codes")
        assert_bits_equal(scales, ref_scales, "scales")
        out = kernels.dequantize(codes, scales, fmt, shape, dtype)
        assert_bits_equal(out, fmt.dequantize(ref_codes, ref_scales, shape, dtype), "dequantized")


# ---------------------------------------------------------------- plain parameters
PLAIN_SIZES = [(1,), (3,), (1025,), (7, 130), (2, 3, 4), (16,), (4, 32), (3, 16)]  # grouped: numel % 16 == 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                      (torch.float32, torch.bfloat16)])
def test_plain_steps_match_reference_single_and_grouped(optimizer, param_dtype, state_dtype, monkeypatch):
    """Small tensors go through one multi-tensor launch, a large one through its own; all bit-identical."""
    monkeypatch.setattr(launcher, "MULTI_TENSOR_MAX_NUMEL", 2048)  # a "large" tensor the interpreter runs quickly
    gen = torch.Generator().manual_seed(5)
    sizes = PLAIN_SIZES + [(launcher.MULTI_TENSOR_MAX_NUMEL + 3,)]

    def make():
        ps = [torch.randn(s, generator=gen).to(param_dtype) for s in sizes]
        gs = [torch.randn(s, generator=gen).to(param_dtype) for s in sizes]
        ms = [(torch.randn(s, generator=gen) * 0.1).to(state_dtype) for s in sizes]
        vs = [(torch.rand(s, generator=gen) * 0.01).to(state_dtype) for s in sizes]
        return [[t.to(DEVICE) for t in ts] for ts in (ps, gs, ms, vs)]

    tensors = make()
    ref = [[t.clone() for t in ts] for ts in tensors]
    grouped = [[t.clone() for t in ts] for ts in tensors]
    single = [[t.clone() for t in ts] for ts in tensors]
    for step in (1, 2):
        if optimizer == "adamw":
            sc = reference.adamw_scalars(step=step, **ADAM)
            reference.plain_adamw_steps_(*ref, scalars=sc)
            kernels.plain_adamw_steps_(*grouped, scalars=sc)
            for p, g, m, v in zip(*single, strict=True):
                kernels.plain_adamw_step_(p, g, m, v, scalars=sc)
        else:
            sc = reference.sgd_scalars(**SGD)
            reference.plain_sgd_steps_(*ref[:3], scalars=sc)
            kernels.plain_sgd_steps_(*grouped[:3], scalars=sc)
            for p, g, m in zip(*single[:3], strict=True):
                kernels.plain_sgd_step_(p, g, m, scalars=sc)
    for ts_ref, ts_grouped, ts_single in zip(ref, grouped, single, strict=True):
        for a, b, c in zip(ts_ref, ts_grouped, ts_single, strict=True):
            assert_bits_equal(b, a, "grouped")
            assert_bits_equal(c, a, "single")


def test_grouped_plain_launch_count(monkeypatch):
    """Five small tensors of 16k elements share one launch; a ragged small one and a big one get their own."""
    monkeypatch.setattr(launcher, "MULTI_TENSOR_MAX_NUMEL", 2048)
    launched = []
    real_launch = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: (launched.append(spec.name),
                                                                     real_launch(spec, grid, **a)))
    sizes = [(16,), (32,), (64,), (2, 8), (4, 32), (129,), (launcher.MULTI_TENSOR_MAX_NUMEL + 1,)]
    ps = [torch.randn(s, device=DEVICE) for s in sizes]
    gs, ms, vs = ([torch.randn(s, device=DEVICE) for s in sizes] for _ in range(3))
    kernels.plain_adamw_steps_(ps, gs, ms, [v.abs() for v in vs], scalars=reference.adamw_scalars(step=1, **ADAM))
    assert sorted(launched) == ["plain/adamw/param-fp32/state-fp32"] * 2 + ["plain_multi/adamw/param-fp32/state-fp32"]


# ---------------------------------------------------------------- through the optimizer
class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.experts = torch.nn.Parameter(torch.randn(2, 8, 32) * 0.1)
        self.down = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x):
        h = self.norm(torch.relu(self.up(x)))
        return self.down(h) + torch.einsum("bd,ekd->bk", h, self.experts)


def train(optimizer_cls, fmt, backend, steps, state_dtype, **kwargs):
    torch.manual_seed(0)
    model = eco.quantize_(TinyModel().to(DEVICE), fmt)
    opt = optimizer_cls(model.parameters(), rounding="nearest", state_dtype=state_dtype, backend=backend, **kwargs)
    data = torch.randn(steps, 8, 64, device=DEVICE)
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(group_size=32)], ids=str)
@pytest.mark.parametrize("optimizer_cls, kwargs", [(eco.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                                   (eco.SGD, dict(lr=0.05, momentum=0.9))], ids=["adamw", "sgd"])
def test_optimizer_steps_kernel_path_equals_reference_path(fmt, optimizer_cls, kwargs):
    """Three steps of eco.AdamW/eco.SGD, backend='triton' vs 'reference': the same model and state, bit for bit."""
    ref_model, ref_opt = train(optimizer_cls, fmt, "reference", 3, torch.bfloat16, **kwargs)
    ker_model, ker_opt = train(optimizer_cls, fmt, "triton", 3, torch.bfloat16, **kwargs)
    assert_same_training_state(ref_model, ref_opt, ker_model, ker_opt)


def test_optimizer_kernel_path_skips_nonfinite_step():
    model, opt = train(eco.AdamW, eco.FP8(), "triton", 1, torch.float32)
    before = model.up.weight.codes.clone()
    for p in model.parameters():
        p.grad = torch.full_like(p.grad if p.grad is not None else torch.zeros(p.shape), float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert_bits_equal(model.up.weight.codes, before, "codes")
    assert opt.skipped_steps == 1


def test_auto_backend_keeps_cpu_tensors_on_the_reference():
    """Under the interpreter, backend='auto' must not route CPU tensors to the (slow) interpreted kernels."""
    from eco.backends import select

    cpu_param = torch.zeros(3)
    assert select("auto", cpu_param) is reference
    assert not kernels.supports(cpu_param)
    if kernels.interpreter_enabled():
        assert select("triton", cpu_param) is kernels
    else:
        with pytest.raises(RuntimeError, match="backend='triton' needs a CUDA tensor"):
            select("triton", cpu_param)


# ---------------------------------------------------------------- the specialization list
def test_every_spec_matches_its_kernel_signature():
    import inspect

    for spec in specs.SPECS:
        names = list(inspect.signature(spec.fn.fn).parameters)
        assert list(spec.signature) == names, spec.name
        assert {n for n, t in spec.signature.items() if t == "constexpr"} == set(spec.constexprs), spec.name
        assert spec.options["enable_fp_fusion"] is False, spec.name  # bit-identity with the reference
        assert set(spec.options) <= {"enable_fp_fusion", "maxnreg"}, spec.name
        assert all(spec.signature[n].startswith("*") for n in spec.aligned)


def test_dispatch_finds_a_spec_for_everything_the_optimizer_runs():
    for config in specs.format_configs():
        for optimizer in ("adamw", "sgd"):
            for rounding in specs.ROUNDINGS:
                for state in specs.STATE_DTYPES:
                    for grad in specs.GRAD_DTYPES:
                        for master in (False, True):
                            passes = (0, 1) if config["group_size"] is None else (1,)
                            for p in passes:
                                assert specs.find_spec("step", optimizer=optimizer, format=config, rounding=rounding,
                                                       state_dtype=state, grad_dtype=grad, master=master, pass_=p)
    assert len({s.name for s in specs.SPECS}) == len(specs.SPECS)


def test_kernel_constants_agree_with_the_formats():
    assert eco_step.ZERO_GROUP_ABSMAX == ZERO_GROUP_ABSMAX
    assert eco.FP8.rho == 448.0 and eco.INT4.rho == 7.0  # RHO in eco_step_kernel


def test_reference_sqrt_is_correctly_rounded():
    """The reference's fp32 sqrt equals the correctly rounded one (fp64 sqrt rounded once); torch's CPU one is not."""
    x = torch.rand(1 << 14) * 10
    exact = torch.sqrt(x.double()).float()
    assert torch.equal(reference.sqrt_rn(x), exact)
    assert torch.equal(torch.from_numpy(np.sqrt(x.numpy())), exact)
    assert math.isclose(reference.sqrt_rn(torch.tensor([4.0])).item(), 2.0)


def test_reference_scales_use_ieee_division():
    """``scale = a / rho`` and ``inv_scale = rho / a`` correctly rounded (torch's ``7.0 / t`` is not)."""
    absmax = torch.rand(1 << 14, 1) * 10 + 1e-3
    for fmt in (eco.FP8(), eco.INT4()):
        x = torch.cat([absmax, torch.zeros_like(absmax)], dim=1).reshape(-1, 1, 2)  # one group per matrix
        scale, inv_scale = fmt.scales_for(x)
        a = absmax.double()
        assert torch.equal(scale, (a / fmt.rho).float())
        assert torch.equal(inv_scale, (fmt.rho / a).float())


def test_bytes_table_in_the_docstring_matches_step_bytes():
    """``eco.kernels.traffic``'s bytes-per-parameter table is what ``step_bytes`` computes (large weight, bf16 grad)."""
    shape = (4096, 4096)
    rows = {
        ("adamw", torch.bfloat16): {"FP8": (12, 19), "INT4": (11, 17.5)},
        ("adamw", torch.float32): {"FP8": (20, 31), "INT4": (19, 29.5)},
        ("sgd", torch.bfloat16): {"FP8": (8, 13), "INT4": (7, 11.5)},
        ("sgd", torch.float32): {"FP8": (12, 19), "INT4": (11, 17.5)},
    }
    for (optimizer, state), by_format in rows.items():
        for name, (grouped, rowwise) in by_format.items():
            line = [ln for ln in traffic.__doc__.splitlines()
                    if ln.startswith(f"{'AdamW' if optimizer == 'adamw' else 'SGD'}, "
                                     f"{'bf16' if state == torch.bfloat16 else 'fp32'} m") and f" {name} " in ln]
            assert len(line) == 1 and f" {grouped:g} " in line[0] and f" {rowwise:g} (" in line[0], line
            fmt_grouped = eco.FP8(block_size=128) if name == "FP8" else eco.INT4(group_size=128)
            fmt_rowwise = eco.FP8() if name == "FP8" else eco.INT4()
            per_param = [kernels.step_bytes(f, shape, optimizer=optimizer, state_dtype=state) / 4096**2
                         for f in (fmt_grouped, fmt_rowwise)]
            assert abs(per_param[0] - grouped) < 0.07
            assert abs(per_param[1] - rowwise) < 0.01
    assert kernels.plain_step_bytes(10) == 280  # fp32 AdamW: 28 bytes per element


def test_quantized_weight_uses_the_kernels_exactly_on_cuda(monkeypatch):
    """``quantize_`` and the forward pass dequantize with the kernels on CUDA, with the format's torch code on CPU."""
    calls = []
    for name in ("quantize", "dequantize"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                     _real(*a, **k))[1])
    model = eco.quantize_(torch.nn.Linear(64, 32).to(DEVICE), eco.FP8(block_size=32))
    out = model(torch.randn(2, 64, device=DEVICE))
    assert out.shape == (2, 32)
    if DEVICE == "cuda":
        assert calls[0] == "quantize" and set(calls[1:]) == {"dequantize"}
    else:
        assert calls == []
