"""The compiled CPU path (``eco.compiled``) computes what the eager reference computes, bit for bit.

Each combination compiles once per process (seconds each on a small CPU), so
the combinations below cover every format, rounding, optimizer and state dtype
without taking their full cross product.
"""

import functools
import warnings

import numpy as np
import pytest
import torch

import eco
from eco import backends, compiled, reference
from eco.formats import ROUNDINGS
from tests.helpers import FORMATS

SHAPE = (5, 96)  # rows not a multiple of 8 (the vector width), columns a multiple of every group size
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)


def _state(fmt, state_dtype, seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    codes, scales = fmt.quantize(w)
    grad = torch.randn(shape, generator=gen) * 0.01
    exp_avg = (torch.randn(shape, generator=gen) * 0.01).to(state_dtype)
    exp_avg_sq = (torch.rand(shape, generator=gen) * 1e-4).to(state_dtype)
    return [codes, scales, grad, exp_avg, exp_avg_sq]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y)


CASES = [  # (format, rounding, state dtype, master)
    *[(name, rounding, torch.bfloat16, False) for name in FORMATS for rounding in ROUNDINGS],
    ("fp8-row", "stochastic", torch.float32, False),
    ("int4-group32", "nearest", torch.float32, True),
]


@pytest.mark.parametrize("name,rounding,state_dtype,with_master", CASES)
def test_compiled_adamw_equals_the_eager_reference(name, rounding, state_dtype, with_master):
    fmt = FORMATS[name]
    ours, theirs = _state(fmt, state_dtype), _state(fmt, state_dtype)
    masters = [fmt.dequantize(ours[0], ours[1], SHAPE) if with_master else None for _ in range(2)]
    if with_master:
        masters[1] = masters[0].clone()
    for step, seed in ((1, 11), (2, 12)):
        scalars = reference.adamw_scalars(step=step, **ADAM)
        compiled.adamw_step_(*ours, masters[0], fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars,
                             rounding=rounding, seed=seed)
        # The eager reference with the compiled path's random numbers.
        reference.adamw_update_(
            *theirs, masters[1], reference.coefficients(scalars), fmt=fmt, shape=torch.Size(SHAPE),
            rounding=rounding, uniform=functools.partial(compiled.counter_uniform, torch.tensor(seed)),
            update_weight=True, injects=not with_master,
        )
        _assert_same(ours, theirs)
        if with_master:
            assert torch.equal(masters[0], masters[1])
    if rounding == "nearest":  # and then exactly the public reference step
        eager = [t.clone() for t in ours]
        scalars = reference.adamw_scalars(step=3, **ADAM)
        compiled.adamw_step_(*ours, masters[0], fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars,
                             rounding=rounding, seed=None)
        reference.adamw_step_(*eager, masters[1], fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars,
                              rounding=rounding, seed=None)
        _assert_same(ours, eager)


@pytest.mark.parametrize("name,weight_decay", [("fp8-block32", 0.0), ("int4-tensor", 0.05)])
def test_compiled_sgd_equals_the_eager_reference(name, weight_decay):
    fmt = FORMATS[name]
    ours, theirs = _state(fmt, torch.float32)[:4], _state(fmt, torch.float32)[:4]
    scalars = reference.sgd_scalars(lr=0.05, momentum=0.9, weight_decay=weight_decay)
    for _ in range(2):
        compiled.sgd_step_(*ours, None, fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars, rounding="nearest",
                           seed=None)
        reference.sgd_step_(*theirs, None, fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars, rounding="nearest",
                            seed=None)
        _assert_same(ours, theirs)


def test_compiled_plain_steps_equal_the_eager_reference():
    def tensors(seed):
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(n, generator=gen) for n in (7, 300)] for _ in range(4)]

    ours, theirs = tensors(0), tensors(0)
    for t in (ours, theirs):
        t[3] = [v.abs() for v in t[3]]
    adam = reference.adamw_scalars(step=4, **ADAM)
    compiled.plain_adamw_steps_(*ours, scalars=adam)
    reference.plain_adamw_steps_(*theirs, scalars=adam)
    sgd = reference.sgd_scalars(lr=0.1, momentum=0.8, weight_decay=0.01)
    compiled.plain_sgd_steps_(*ours[:3], scalars=sgd)
    reference.plain_sgd_steps_(*theirs[:3], scalars=sgd)
    for a, b in zip(ours, theirs, strict=True):
        _assert_same(a, b)


def test_counter_uniform_is_uniform_and_independent_across_seeds_and_neighbours():
    y = torch.empty(1 << 16)
    u = compiled.counter_uniform(torch.tensor(123456789123), y)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov: sup |F_n - F| < 1.63 / sqrt(n) at the 1% level.
    sorted_u, _ = u.double().sort()
    expected = torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u)
    assert (sorted_u - expected).abs().max() < 1.63 / len(u) ** 0.5
    # Neighbours and the next seed are uncorrelated (|r| < 4/sqrt(n)).
    other = compiled.counter_uniform(torch.tensor(123456789124), y)
    for a, b in ((u[:-1], u[1:]), (u, other)):
        r = torch.corrcoef(torch.stack((a, b)).double())[0, 1]
        assert abs(r) < 4 / len(u) ** 0.5
    assert torch.equal(u, compiled.counter_uniform(torch.tensor(123456789123), y))  # reproducible


def _lowbias32_uniform(seed: int, numel: int) -> np.ndarray:
    """counter_uniform written independently, in numpy uint32 arithmetic (wrapping by definition)."""
    with np.errstate(over="ignore"):
        x = np.arange(numel, dtype=np.uint64).astype(np.uint32) * np.uint32((seed >> 32) | 1) \
            + np.uint32(seed & 0xFFFFFFFF)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 123456789123, ((2**30 - 1) << 32) + 3_000_000_000]


@pytest.mark.parametrize("how", ["eager", "compiled", "int64 index"])
def test_counter_uniform_is_the_lowbias32_hash_bit_for_bit(how, monkeypatch):
    """The int32 implementation wraps exactly like uint32 arithmetic, eager and compiled, for seeds whose
    low word has the sign bit set; tensors of 2**31+ elements (the int64 index path) give the same values."""
    if how == "int64 index":
        monkeypatch.setattr(compiled, "_INT32_INDEX_LIMIT", 100)
    fn = compiled.counter_uniform
    if how == "compiled":
        fn = torch.compile(fn, dynamic=False, fullgraph=True)
    y = torch.empty(7, 4099)
    for seed in SEEDS:
        expected = torch.from_numpy(_lowbias32_uniform(seed, y.numel())).reshape(y.shape)
        assert torch.equal(fn(torch.tensor(seed), y), expected), seed


def test_stochastic_rounding_with_counter_uniforms_is_unbiased():
    """Many seeds quantizing the same values: the mean stored value approaches the input."""
    fmt = eco.FP8(block_size=32)
    x = torch.linspace(-1, 1, 64).reshape(2, 32) * 0.37
    total = torch.zeros_like(x, dtype=torch.float64)
    n = 400
    for seed in range(n):
        codes, scales = fmt.quantize(x, "stochastic", uniform=functools.partial(compiled.counter_uniform,
                                                                                torch.tensor(seed * 7919)))
        total += fmt.dequantize(codes, scales, x.shape).double()
    grid_step = (x.abs() / 8).clamp(min=1e-3)  # E4M3's spacing is at most |x| / 8
    # the mean of n draws within a step of x: 4 standard deviations of n Bernoulli draws
    assert ((total / n - x.double()).abs() <= 4 * grid_step * 0.5 / n**0.5).all()


def test_compiled_is_opt_in_and_refuses_tensors_it_cannot_run(monkeypatch):
    monkeypatch.delenv("ECO_BACKEND", raising=False)
    cpu = torch.empty(1 << 16)
    assert backends.select("auto", cpu) is reference  # auto never compiles on CPU
    assert backends.select("compiled", cpu) is compiled
    with pytest.raises(RuntimeError, match="backend='compiled' runs CPU tensors"):
        backends.select("compiled", torch.empty(4, device="meta"))
    monkeypatch.setattr(compiled, "_cxx_compiler", lambda: None)  # a machine without a C++ compiler
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        backends.select("compiled", cpu)
    monkeypatch.setenv("ECO_BACKEND", "reference")
    assert backends.select("compiled", cpu) is reference


def test_a_compile_failure_falls_back_to_the_reference_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(compiled, "_plain_adamw", lambda: broken)
    p, g, m, v = (torch.randn(10) for _ in range(4))
    v = v.abs()
    expected = [t.clone() for t in (p, g, m, v)]
    scalars = reference.adamw_scalars(step=1, **ADAM)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        compiled.plain_adamw_steps_([p], [g], [m], [v], scalars=scalars)
    reference.plain_adamw_steps_(*([t] for t in expected), scalars=scalars)
    assert torch.equal(p, expected[0]) and torch.equal(m, expected[2])
    assert "no compiler here" in compiled.compile_failure()
    assert backends.select("compiled", torch.empty(10)) is compiled  # training goes on, on the eager path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later steps stay quietly on the reference
        compiled.plain_adamw_steps_([p], [g], [m], [v], scalars=scalars)
    reference.plain_adamw_steps_(*([t] for t in expected), scalars=scalars)
    assert torch.equal(p, expected[0]) and torch.equal(m, expected[2])


def test_an_optimizer_on_the_compiled_backend_trains_like_the_reference():
    """Several eco.AdamW steps, nearest rounding: backend='compiled' equals backend='reference'."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 64) * 0.1
    params = [torch.nn.Parameter(eco.QuantizedTensor.from_float(w0, eco.FP8())) for _ in range(2)]
    opts = [eco.AdamW([p], lr=1e-2, rounding="nearest", state_dtype=torch.bfloat16, backend=backend)
            for p, backend in zip(params, ("compiled", "reference"), strict=True)]
    for _ in range(3):
        grad = torch.randn(16, 64)
        for p, opt in zip(params, opts, strict=True):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(params[0].codes.view(torch.uint8), params[1].codes.view(torch.uint8))
    assert torch.equal(opts[0].state[params[0]]["exp_avg"], opts[1].state[params[1]]["exp_avg"])
