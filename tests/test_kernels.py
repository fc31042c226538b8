"""The Triton kernels (``eco.kernels``) against the reference (``eco.reference``), bit for bit.

On CPU these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernels on CUDA
tensors. Codes, scales, moments (every state format) and master copies must be
bit-identical, round-to-nearest and stochastic rounding alike: the kernels
evaluate the reference's expressions in the same order and draw the same
counter-based random numbers (``eco.rng``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import eco
from eco import kernels, reference, rng, states
from eco.formats import ZERO_GROUP_ABSMAX, format_from_config, format_tag
from eco.kernels import eco_step, launcher, moments, specs, traffic
from eco.kernels import steps as kernel_steps
from eco.reference import Moment
from tests.helpers import assert_bits_equal, assert_same_training_state, bits, traffic_table

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


def to_device(x):
    if isinstance(x, Moment):
        return Moment(x.fmt, tuple(t.to(DEVICE) for t in x.tensors))
    return x.to(DEVICE)


def random_moment(name: str, role: str, shape, gen, scale: float) -> Moment:
    """A state of format ``name`` holding random values (stored by the format itself: a realistic state)."""
    fmt = states.momentum_format(name) if role == "m" else states.second_moment_format(name)
    fmt = states.for_shape(fmt, shape)
    tensors = fmt.allocate(shape, "cpu")
    if isinstance(fmt, states.Factored):
        row, col, mean = tensors
        row.copy_(torch.rand(row.shape, generator=gen) * scale)
        col.copy_(torch.rand(col.shape, generator=gen) * scale)
        mean.copy_(col.mean(dim=-1) * 0.9)
        if mean.numel() > 1:
            mean.view(-1)[0] = 0.0  # a matrix whose mean is 0 reads v = 0
    else:
        x = torch.randn(shape, generator=gen) * scale
        x = x.abs() if role == "v" else x
        lay = reference.layout(shape)
        fmt.store_(tuple(t.view(lay.rows, -1) for t in tensors), x.view(lay.rows, -1), rng.key(99))
    return Moment(fmt, tensors)


def make_state(fmt, shape, optimizer, state_dtype, grad_dtype, seed=0, states_=None):
    """A quantized weight plus gradient and moments (non-trivial: moments and codes already moved).

    ``states_``: (m, v) state-format names; default both ``state_dtype`` as plain tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    zeros = shape == "zeros"
    shape = (7, 130) if zeros and fmt.group_size is None else ((3, 128) if zeros else shape)
    w = torch.zeros(shape) if zeros else torch.randn(shape, generator=gen)
    codes, scales = fmt.quantize(w)
    grad = torch.zeros(shape) if zeros else torch.randn(shape, generator=gen) * 0.1
    state = dict(codes=codes, scales=scales, grad=grad.to(grad_dtype))
    if states_ is None:
        state["exp_avg"] = (torch.randn(shape, generator=gen) * 0.01).to(state_dtype)
        if optimizer == "adamw":
            state["exp_avg_sq"] = (torch.rand(shape, generator=gen) * 1e-3).to(state_dtype)
    else:
        state["exp_avg"] = random_moment(states_[0], "m", shape, gen, 0.01)
        if optimizer == "adamw":
            state["exp_avg_sq"] = random_moment(states_[1], "v", shape, gen, 1e-3)
    return torch.Size(shape), {k: to_device(v) for k, v in state.items()}


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
    return {k: (Moment(v.fmt, tuple(t.clone() for t in v.tensors)) if isinstance(v, Moment) else v.clone())
            for k, v in state.items()}


def assert_states_equal(actual, expected):
    for key, value in expected.items():
        if isinstance(value, Moment):
            for i, (a, b) in enumerate(zip(actual[key].tensors, value.tensors, strict=True)):
                assert_bits_equal(a, b, f"{key}[{i}] ({value.fmt.name})")
        else:
            assert_bits_equal(actual[key], value, key)


# ---------------------------------------------------------------- the step, round to nearest, fp32 states
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


# ---------------------------------------------------------------- every state format, both roundings
#: a shape per format: ragged state blocks (a last dimension not a multiple of 128), 3-D expert tensors,
#: an odd INT4 row
STATE_SHAPES = {"fp8-row": (3, 200), "int4-tensor": (2, 3, 165), "fp8-block32": (3, 160),
                "int4-group32": (2, 2, 96), "fp8-block64": (2, 192), "int4-group64": (3, 320),
                "fp8-block128": (2, 3, 128), "int4-group128": (3, 256)}


FORMAT_BY_TAG = {format_tag(fmt): fmt for fmt in FORMATS}
GROUPS = (32, 64, 128)


def _pair_formats(j: int) -> list:
    """Four weight formats for the ``j``-th state pair: both two-pass formats (row-wise FP8, tensor-wise INT4) and
    one FP8 block and one INT4 group size, rotating over 32, 64 and 128 (so each state format meets every one)."""
    return [FORMAT_BY_TAG[t] for t in ("fp8-row", "int4-tensor", f"fp8-block{GROUPS[j % 3]}",
                                       f"int4-group{GROUPS[(j + 1) % 3]}")]


def _state_cases():
    """Every (optimizer, state pair) of ``eco.states``, each with four weight formats (:func:`_pair_formats`);
    rounding and gradient dtype rotate so that each pair meets both roundings and both gradient dtypes, and each
    weight format many of their combinations (80 cases rather than the 640 of the full product)."""
    cases = []
    for optimizer, pairs in specs.STEP_STATES.items():
        for j, pair in enumerate(pairs):
            for i, fmt in enumerate(_pair_formats(j)):
                k = i + j + (optimizer == "sgd")
                rounding = ("stochastic", "nearest")[k % 2]
                grad = (torch.bfloat16, torch.float32)[(k // 2) % 2]
                tag = f"{optimizer}-{format_tag(fmt)}-{specs.states_tag(pair)}-{rounding}-{str(grad)[6:]}"
                cases.append(pytest.param(optimizer, fmt, pair, rounding, grad, id=tag))
    return cases


@pytest.fixture
def no_reference_fallback(monkeypatch):
    """Fail if the kernel backend hands a step to ``eco.reference`` (a pair without a kernel would pass the
    bit-identity tests trivially)."""
    def refuse(*args, **kwargs):
        raise AssertionError("eco.kernels fell back to the reference")

    monkeypatch.setattr(kernel_steps, "_reference_step", refuse)


@pytest.mark.parametrize("optimizer, fmt, pair, rounding, grad_dtype", _state_cases())
def test_every_state_format_matches_reference(optimizer, fmt, pair, rounding, grad_dtype, no_reference_fallback):
    """Two steps from random states of every pair of state formats: codes, scales and every state tensor
    bit-identical, stochastic rounding included (the same random stream, element by element), on kernels."""
    shape, state = make_state(fmt, STATE_SHAPES[format_tag(fmt)], optimizer, None, grad_dtype, seed=1,
                              states_=pair)
    ref, ker = clone_state(state), clone_state(state)
    for step in (1, 2):
        run_step(reference, optimizer, fmt, shape, ref, step, rounding, seed=1000 + step)
        run_step(kernels, optimizer, fmt, shape, ker, step, rounding, seed=1000 + step)
        assert_states_equal(ker, ref)
    assert not torch.equal(bits(ker["exp_avg"].tensors[0]), bits(state["exp_avg"].tensors[0]))


def _master_cases():
    """Every state pair with a master copy, on one weight format each (the four families in turn) and both
    roundings in turn."""
    cases = []
    for optimizer, pairs in specs.STEP_STATES.items():
        for j, pair in enumerate(pairs):
            k = j + (optimizer == "sgd")
            fmt = _pair_formats(j)[k % 4]
            rounding = ("stochastic", "nearest")[(k // 4) % 2]
            cases.append(pytest.param(fmt, optimizer, pair, rounding,
                                      id=f"{optimizer}-{format_tag(fmt)}-{specs.states_tag(pair)}-{rounding}"))
    return cases


@pytest.mark.parametrize("fmt, optimizer, pair, rounding", _master_cases())
def test_step_with_master_weights(fmt, optimizer, pair, rounding, no_reference_fallback):
    """The master-weight baseline: the master copy becomes w~, codes are q(w~), nothing is injected."""
    shape, state = make_state(fmt, STATE_SHAPES[format_tag(fmt)], optimizer, None, torch.bfloat16, seed=2,
                              states_=pair)
    master = fmt.dequantize(state["codes"], state["scales"], shape) + 1e-3
    ref, ker = clone_state(state), clone_state(state)
    ref_master, ker_master = master.clone(), master.clone()
    run_step(reference, optimizer, fmt, shape, ref, 1, rounding, seed=5, master=ref_master)
    run_step(kernels, optimizer, fmt, shape, ker, 1, rounding, seed=5, master=ker_master)
    assert_states_equal(ker, ref)
    assert_bits_equal(ker_master, ref_master, "master")
    assert not torch.equal(ker_master, master)


def test_seed_none_draws_from_torch_like_the_reference():
    """``seed=None`` with stochastic rounding: one seed from torch's global generator, the reference's."""
    fmt = eco.INT4(group_size=32)
    shape, state = make_state(fmt, (2, 128), "adamw", None, torch.float32, states_=("bf16", "bf16"))
    ref, ker = clone_state(state), clone_state(state)
    torch.manual_seed(3)
    run_step(reference, "adamw", fmt, shape, ref, 1, "stochastic", seed=None)
    torch.manual_seed(3)
    run_step(kernels, "adamw", fmt, shape, ker, 1, "stochastic", seed=None)
    assert_states_equal(ker, ref)


def test_lr_zero_updates_moments_only(monkeypatch):
    """``update_weight=False`` (lr == 0): moments move, codes and scales do not (same as the reference). The one
    quantized step the kernels hand to the reference: nothing is launched."""
    launched = []
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: launched.append(spec.name))
    fmt = eco.FP8(block_size=32)
    shape, state = make_state(fmt, (3, 128), "adamw", torch.float32, torch.bfloat16, seed=4)
    ref, ker = clone_state(state), clone_state(state)
    scalars = reference.adamw_scalars(step=1, inject=True, **{**ADAM, "lr": 0.0})
    for backend, st in ((reference, ref), (kernels, ker)):
        backend.adamw_step_(st["codes"], st["scales"], st["grad"], st["exp_avg"], st["exp_avg_sq"], None, fmt=fmt,
                            shape=shape, scalars=scalars, rounding="nearest", seed=None, update_weight=False)
    assert_states_equal(ker, ref)
    assert_bits_equal(ker["codes"], state["codes"], "codes")
    assert launched == []


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


@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(), eco.FP8(group_size=64), eco.INT4(group_size=32)], ids=str)
def test_stochastic_quantize_matches_the_reference(fmt):
    """``quantize(..., "stochastic", seed)``: the weight stream of ``seed``, as ``reference.quantize`` draws it."""
    x = torch.randn(3, 192, device=DEVICE)
    codes, scales = kernels.quantize(x, fmt, "stochastic", seed=2**40 + 17)
    ref_codes, ref_scales = reference.quantize(x, fmt, "stochastic", seed=2**40 + 17)
    assert_bits_equal(codes, ref_codes, "codes")
    assert_bits_equal(scales, ref_scales, "scales")
    nearest, _ = fmt.quantize(x)
    assert not torch.equal(bits(codes), bits(nearest))


# ---------------------------------------------------------------- plain parameters
PLAIN_SIZES = [(1,), (3,), (1025,), (7, 130), (2, 3, 4), (16,), (4, 32), (3, 16)]  # grouped: numel % 16 == 0


def plain_tensors(sizes, param_dtype, pair, optimizer, gen):
    ps = [torch.randn(s, generator=gen).to(param_dtype) for s in sizes]
    gs = [torch.randn(s, generator=gen).to(param_dtype) for s in sizes]
    ms = [random_moment(pair[0], "m", s, gen, 0.1) for s in sizes]
    vs = [random_moment(pair[1], "v", s, gen, 0.01) for s in sizes] if optimizer == "adamw" else None
    return [[to_device(t) for t in ts] if ts is not None else None for ts in (ps, gs, ms, vs)]


def clone_all(lists):
    return [[clone_state({"x": t})["x"] for t in ts] if ts is not None else None for ts in lists]


def step_plain(backend, optimizer, tensors, step, seeds, single=False):
    ps, gs, ms, vs = tensors
    if optimizer == "adamw":
        sc = reference.adamw_scalars(step=step, **ADAM)
        if single:
            for p, g, m, v, seed in zip(ps, gs, ms, vs, seeds, strict=True):
                backend.plain_adamw_step_(p, g, m, v, scalars=sc, seed=seed)
        else:
            backend.plain_adamw_steps_(ps, gs, ms, vs, scalars=sc, seeds=seeds)
    else:
        sc = reference.sgd_scalars(**SGD)
        if single:
            for p, g, m, seed in zip(ps, gs, ms, seeds, strict=True):
                backend.plain_sgd_step_(p, g, m, scalars=sc, seed=seed)
        else:
            backend.plain_sgd_steps_(ps, gs, ms, scalars=sc, seeds=seeds)


def assert_plain_equal(actual, expected, what):
    for ts_a, ts_e in zip(actual, expected, strict=True):
        for a, e in zip(ts_a or (), ts_e or (), strict=True):
            assert_states_equal({"x": a}, {"x": e}) if isinstance(e, Moment) else assert_bits_equal(a, e, what)


PLAIN_CASES = [("adamw", torch.float32, ("fp32", "fp32")), ("adamw", torch.bfloat16, ("bf16", "bf16")),
               ("adamw", torch.float32, ("bf16", "bf16")), ("sgd", torch.float32, ("fp32", None)),
               ("sgd", torch.bfloat16, ("bf16", None)), ("adamw", torch.bfloat16, ("int8", "factored")),
               ("adamw", torch.float32, ("int8", "fp8")), ("sgd", torch.float32, ("int8", None)),
               # mixed pairs and an E4M3 m: the step kernel's tiles too
               ("adamw", torch.bfloat16, ("fp8", "bf16")), ("adamw", torch.float32, ("bf16", "factored")),
               ("sgd", torch.bfloat16, ("fp8", None))]


@pytest.mark.parametrize("optimizer, param_dtype, pair", PLAIN_CASES,
                         ids=[f"{o}-{str(d)[6:]}-{specs.states_tag(p)}" for o, d, p in PLAIN_CASES])
def test_plain_steps_match_reference_single_and_grouped(optimizer, param_dtype, pair, monkeypatch,
                                                        no_reference_fallback):
    """Small tensors go through one multi-tensor launch, a large one through its own; all bit-identical.

    Both moments fp32 or both bf16 run the flat plain kernels; every other pair the step kernel's tiles (1-D
    tensors under a factored configuration keep a full fp32 v); stochastic rounding of the states from
    each tensor's seed."""
    monkeypatch.setattr(launcher, "MULTI_TENSOR_MAX_NUMEL", 2048)  # a "large" tensor the interpreter runs quickly
    sizes = PLAIN_SIZES + [(launcher.MULTI_TENSOR_MAX_NUMEL + 3,), (2, 256), (3, 128)]
    tensors = plain_tensors(sizes, param_dtype, pair, optimizer, torch.Generator().manual_seed(5))
    ref, grouped, single = clone_all(tensors), clone_all(tensors), clone_all(tensors)
    for step in (1, 2):
        seeds = [100 * step + i for i in range(len(sizes))]
        step_plain(reference, optimizer, ref, step, seeds)
        step_plain(kernels, optimizer, grouped, step, seeds)
        step_plain(kernels, optimizer, single, step, seeds, single=True)
    assert_plain_equal(grouped, ref, "grouped")
    assert_plain_equal(single, ref, "single")


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


def test_plain_gradient_of_another_dtype_runs_on_the_reference(monkeypatch):
    """The reference reads a gradient in its own dtype; the flat kernels would read it as the parameter's."""
    launched = []
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: launched.append(spec.name))
    p = torch.randn(64, dtype=torch.bfloat16, device=DEVICE)
    g = torch.randn(64, device=DEVICE)
    m, v = torch.zeros(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    ref_p, ref_m, ref_v = p.clone(), m.clone(), v.clone()
    sc = reference.adamw_scalars(step=1, **ADAM)
    kernels.plain_adamw_step_(p, g, m, v, scalars=sc)
    reference.plain_adamw_step_(ref_p, g, ref_m, ref_v, scalars=sc)
    assert launched == []
    assert_bits_equal(p, ref_p, "param")


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


def train(optimizer_cls, fmt, backend, steps, rounding="nearest", **kwargs):
    torch.manual_seed(0)
    model = eco.quantize_(TinyModel().to(DEVICE), fmt)
    opt = optimizer_cls(model.parameters(), rounding=rounding, backend=backend, seed=3, **kwargs)
    data = torch.randn(steps, 8, 64, device=DEVICE)
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


OPTIMIZER_CASES = {  # the pairs of the README, a mixed pair with an E4M3 m; the weight formats alternating
    "adamw-bf16-int4-group32": (eco.AdamW, eco.INT4(group_size=32), dict(lr=1e-2, weight_decay=0.1,
                                                                          state_dtype=torch.bfloat16)),
    "adamw-int8-factored-fp8-row": (eco.AdamW, eco.FP8(), dict(lr=1e-2, weight_decay=0.1, momentum="int8",
                                                               second_moment="factored")),
    "sgd-bf16-fp8-row": (eco.SGD, eco.FP8(), dict(lr=0.05, momentum=0.9, state_dtype=torch.bfloat16)),
    "sgd-int8-int4-group32": (eco.SGD, eco.INT4(group_size=32), dict(lr=0.05, momentum=0.9, momentum_state="int8")),
    "adamw-fp8-bf16-int4-tensor": (eco.AdamW, eco.INT4(), dict(lr=1e-2, weight_decay=0.1, momentum="fp8",
                                                              second_moment="bf16")),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_steps_kernel_path_equals_reference_path(case, no_reference_fallback):
    """Three stochastic steps of eco.AdamW/eco.SGD, backend='triton' vs 'reference': the same model and state,
    bit for bit (quantized weights, a 3-D expert tensor, 1-D biases and norms)."""
    optimizer_cls, fmt, kwargs = OPTIMIZER_CASES[case]
    ref_model, ref_opt = train(optimizer_cls, fmt, "reference", 3, "stochastic", **kwargs)
    ker_model, ker_opt = train(optimizer_cls, fmt, "triton", 3, "stochastic", **kwargs)
    assert_same_training_state(ref_model, ref_opt, ker_model, ker_opt)


def test_optimizer_kernel_path_skips_nonfinite_step():
    model, opt = train(eco.AdamW, eco.FP8(), "triton", 1)
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


@pytest.mark.parametrize("shape, variant", [((4, 128), "factored_stats/grad-bf16"),
                                            ((2, 3, 48), "factored_stats/grad-bf16"),
                                            ((3, 200), "factored_stats/grad-bf16/ragged")])
def test_factored_statistics_take_the_aligned_variant_only_when_rows_align(shape, variant, monkeypatch):
    """Rows a multiple of 16 elements: the statistics kernel with alignment hints (128-bit gradient loads when
    compiled); any other row length: the ragged one. Bits equal to the reference either way."""
    launched = []
    real = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: (launched.append(spec.name),
                                                                     real(spec, grid, **a)))
    fmt = eco.FP8()
    shape, state = make_state(fmt, shape, "adamw", None, torch.bfloat16, seed=3, states_=("int8", "factored"))
    ref, ker = clone_state(state), clone_state(state)
    run_step(reference, "adamw", fmt, shape, ref, 1, "stochastic", seed=9)
    run_step(kernels, "adamw", fmt, shape, ker, 1, "stochastic", seed=9)
    assert_states_equal(ker, ref)
    assert [n for n in launched if n.startswith("factored_stats")] == [variant]


def test_grouped_factored_statistics_check_every_gradient_offset():
    """The launcher promises aligned rows for a group only if every gradient starts a whole number of 16 bytes
    after the first: one 2 bytes off makes the group ragged."""
    shape = torch.Size((2, 128))
    grads = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2)]
    vs = [states.FACTORED_STATE.allocate(shape, "cpu") for _ in range(2)]
    items = [(shape, shape, g, *v) for g, v in zip(grads, vs, strict=True)]
    assert launcher.factored_tables(items)[-1] is True
    off = torch.zeros(shape.numel() + 1, dtype=torch.bfloat16)[1:].view(shape)
    assert launcher.factored_tables([items[0], (shape, shape, off, *vs[1])])[-1] is False


# ---------------------------------------------------------------- overflow (issue 14, items 1 and 2)
def overflow_pair(pair):
    return dict(state_dtype=torch.float32) if pair == "fp32" else dict(momentum="int8", second_moment="factored")


def finite_state(model, opt):
    w = model.weight
    tensors = [w.dequantize()] + [t for t in opt.state[w].values()
                                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return all(torch.isfinite(t.float()).all() for t in tensors)


@pytest.mark.parametrize("fmt", [eco.INT4(), eco.FP8()], ids=str)
@pytest.mark.parametrize("pair", ["fp32", "int8-factored"])
def test_huge_gradient_through_the_kernels(fmt, pair):
    """|g| = 1e20 (whose square overflows fp32) is refused before anything is written; |g| = 0.99 * 2**63 (the
    largest class the optimizer accepts) steps, saturating where it must: the kernels' bits are the reference's
    and everything stays finite; training goes on (the issue's tensor-wise INT4 matrix was wiped to 0)."""
    runs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = eco.quantize_(torch.nn.Linear(256, 8, bias=False).to(DEVICE), fmt)
        opt = eco.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, backend=backend, seed=0,
                        **overflow_pair(pair))
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            g = torch.randn(8, 256, generator=gen) * 1e-2
            if step == 1:
                g[0, 0] = 1e20
            if step == 2:
                g[0, 0], g[3, 7] = 0.99 * 2.0**63, -0.99 * 2.0**63
            model.weight.grad = g.to(DEVICE)
            if step == 1:
                before = model.weight.codes.clone()
                with pytest.warns(RuntimeWarning, match="2\\*\\*63"):
                    opt.step()
                assert torch.equal(model.weight.codes, before)
            else:
                opt.step()
            assert finite_state(model, opt)
        assert opt.skipped_steps == 1
        assert (model.weight.dequantize() != 0).any()
        runs[backend] = (model, opt)
    assert_same_training_state(*runs["reference"], *runs["triton"])


@pytest.mark.parametrize("optimizer_cls, kwargs", [
    (eco.AdamW, dict(weight_decay=0.0, state_dtype=torch.float32)),
    (eco.AdamW, dict(weight_decay=0.0, momentum="int8", second_moment="factored")),
    (eco.SGD, dict(momentum=0.9, state_dtype=torch.bfloat16)),
], ids=["adamw-fp32", "adamw-int8-factored", "sgd-bf16"])
def test_tiny_learning_rate_through_the_kernels(optimizer_cls, kwargs):
    """lr = 1e-41 (the injection coefficient overflows fp32) is refused; lr = 3e-20 runs with an injection
    coefficient near 2**62 whose products saturate the momentum: the kernels' bits are the reference's, finite."""
    runs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = eco.quantize_(torch.nn.Linear(256, 8, bias=False).to(DEVICE), eco.INT4(group_size=32))
        opt = optimizer_cls(model.parameters(), lr=1e-41, backend=backend, seed=0, **kwargs)
        gen = torch.Generator().manual_seed(2)
        model.weight.grad = (torch.randn(8, 256, generator=gen) * 1e-2).to(DEVICE)
        with pytest.warns(RuntimeWarning, match="learning rate too small"):
            opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-20
        for _ in range(3):
            model.weight.grad = (torch.randn(8, 256, generator=gen) * 1e-2).to(DEVICE)
            opt.step()
            assert finite_state(model, opt)
        runs[backend] = (model, opt)
    assert opt.skipped_steps == 1
    assert_same_training_state(*runs["reference"], *runs["triton"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: v * inv_bc2
@pytest.mark.parametrize("pair", [("fp32", "fp32"), ("int8", "factored")], ids=specs.states_tag)
def test_extreme_inputs_saturate_like_the_reference(pair):
    """Weights, moments and gradients at the edge of what a step accepts (|w|, |m|, v near 2**126, |g| near
    2**63): v*inv_bc2 overflows to inf and is clamped, and every stored value is the reference's, finite."""
    fmt = eco.FP8(group_size=32)
    shape = (2, 128)
    gen = torch.Generator().manual_seed(8)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    codes, scales = fmt.quantize(sign * 8e37 * torch.rand(shape, generator=gen))
    m = states.momentum_format(pair[0])
    m_tensors = m.allocate(shape, "cpu")
    m.store_(m_tensors, sign * 8e37, rng.key(1))
    v = states.second_moment_format(pair[1])
    v_tensors = v.allocate(shape, "cpu")
    if pair[1] == "factored":
        for t in v_tensors:
            t.fill_(8e37)
    else:
        v.store_(v_tensors, torch.full(shape, 8e37), rng.key(2))
    state = {k: to_device(x) for k, x in dict(codes=codes, scales=scales, grad=sign * 0.99 * 2.0**63,
                                               exp_avg=Moment(m, m_tensors), exp_avg_sq=Moment(v, v_tensors)).items()}
    ref, ker = clone_state(state), clone_state(state)
    for step in (1, 2):
        run_step(reference, "adamw", fmt, torch.Size(shape), ref, step, "stochastic", seed=step)
        run_step(kernels, "adamw", fmt, torch.Size(shape), ker, step, "stochastic", seed=step)
        assert_states_equal(ker, ref)
    values = [fmt.dequantize(ker["codes"], ker["scales"], shape)] + list(ker["exp_avg"].tensors)
    assert all(torch.isfinite(t.float()).all() for t in values + list(ker["exp_avg_sq"].tensors))


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


def test_every_pair_of_state_formats_has_a_kernel():
    """No state pair falls back to the reference: every (m, v) pair of ``eco.states`` formats (SGD: every m) has
    a step spec for every weight format with kernels, both roundings, both gradient dtypes, with and without a
    master copy, every pass; and every pair of a plain parameter a flat plain kernel or the step kernel's tiles."""
    pairs = {"adamw": [(m, v) for m in states.MOMENTUM_FORMATS for v in states.SECOND_MOMENT_FORMATS],
             "sgd": [(m, None) for m in states.MOMENTUM_FORMATS]}
    for optimizer, listed in pairs.items():
        assert set(specs.STEP_STATES[optimizer]) == set(listed)
        for pair in listed:
            for grad in specs.GRAD_DTYPES:
                for config in specs.format_configs():
                    for rounding in specs.ROUNDINGS:
                        for master in (False, True):
                            for p in ((0, 1) if config["group_size"] is None else (1,)):
                                kernels_ = ("step",) + (("step_multi",) if pair in specs.MULTI_STATES[optimizer]
                                                        else ())
                                for kernel in kernels_:
                                    assert specs.find_spec(kernel, optimizer=optimizer, format=config,
                                                           rounding=rounding, states=pair, grad_dtype=grad,
                                                           master=master, pass_=p), (kernel, config, pair, master)
                flat = specs.find_spec("plain", optimizer=optimizer, states=pair, grad_dtype=grad)
                tiles = specs.find_spec("step", optimizer=optimizer, states=pair, grad_dtype=grad)
                assert (flat is None) != (tiles is None), (optimizer, pair, grad)
    assert len({s.name for s in specs.SPECS}) == len(specs.SPECS)


def test_kernel_constants_agree_with_the_formats():
    assert moments.ZERO_GROUP_ABSMAX == ZERO_GROUP_ABSMAX
    assert eco.FP8.rho == 448.0 and eco.INT4.rho == 7.0 and eco_step.INT4_RHO == 7.0
    assert moments.STATE_BLOCK == states.STATE_BLOCK and moments.INT8_RHO == states.INT8_MAX
    assert moments.SATURATION == reference.SATURATION
    assert set(specs.STATE_FORMATS) == set(states.MOMENTUM_FORMATS) | set(states.SECOND_MOMENT_FORMATS)


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
    table = traffic_table()
    assert len(table) == 2 * len(traffic.TABLE_STATES)
    for optimizer, pair in traffic.TABLE_STATES:
        for name in ("FP8", "INT4"):
            grouped, rowwise, _ = table[(traffic.row_label(optimizer, pair), name)]
            fmt_grouped = eco.FP8(block_size=128) if name == "FP8" else eco.INT4(group_size=128)
            fmt_rowwise = eco.FP8() if name == "FP8" else eco.INT4()
            per_param = [kernels.step_bytes(f, shape, optimizer=optimizer, states=pair) / 4096**2
                         for f in (fmt_grouped, fmt_rowwise)]
            assert per_param == pytest.approx([grouped, rowwise], abs=0.006), (optimizer, pair, name)
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
