"""The compiled CPU path (``eco.compiled``) computes what the eager reference computes, bit for bit.

Each combination compiles once per process (seconds each on a small CPU), so
the combinations below cover every weight format, rounding, optimizer and
state format without taking their full cross product. Stochastic steps are
bit-identical too: both paths draw from ``eco.rng``.
"""

import warnings

import pytest
import torch

import eco
from eco import backends, compiled, reference, rng, states
from tests.helpers import FORMATS, assert_bits_equal, assert_same_training_state

SHAPE = (5, 96)  # rows not a multiple of 8 (the vector width), columns a multiple of every group size
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)


def _state(fmt, m_name, v_name, seed=0, shape=SHAPE):
    """codes, scales, grad, m and v (as ``reference.Moment``s, non-trivial values) of one quantized weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    codes, scales = fmt.quantize(w)
    grad = torch.randn(shape, generator=gen) * 0.01
    moments = []
    for fmt_of, name, values in ((states.momentum_format, m_name, torch.randn(shape, generator=gen) * 0.01),
                                 (states.second_moment_format, v_name, torch.rand(shape, generator=gen) * 1e-4)):
        sf = states.for_shape(fmt_of(name), shape) if name else None
        if sf is None:
            continue
        mo = reference.Moment(sf, sf.allocate(shape, "cpu"))
        if not isinstance(sf, states.Factored):
            lay = reference.layout(shape)
            sf.store_(tuple(t.view(lay.rows, -1) for t in mo.tensors), values.reshape(lay.rows, lay.cols),
                      rng.key(seed + 1))
        else:
            for t in mo.tensors:
                t.copy_(torch.rand(t.shape, generator=gen) * 1e-4)
        moments.append(mo)
    return [codes, scales, grad, *moments]


def _flat(state):
    out = []
    for x in state:
        out.extend(x.tensors if isinstance(x, reference.Moment) else [x])
    return out


def _assert_same(a, b):
    for x, y in zip(_flat(a), _flat(b), strict=True):
        assert_bits_equal(x, y, "state")


CASES = [  # (format, rounding, m format, v format, master)
    *[(name, rounding, "bf16", "bf16", False) for name in FORMATS for rounding in ("nearest", "stochastic")],
    *[(name, "stochastic", "int8", "factored", False) for name in FORMATS],
    ("fp8-row", "stochastic", "fp8", "fp8", False),
    ("fp8-block32", "nearest", "fp32", "fp32", False),
    ("int4-group32", "nearest", "fp32", "fp32", True),
]


@pytest.mark.parametrize("name,rounding,m_name,v_name,with_master", CASES)
def test_compiled_adamw_equals_the_eager_reference(name, rounding, m_name, v_name, with_master):
    fmt = FORMATS[name]
    ours, theirs = _state(fmt, m_name, v_name), _state(fmt, m_name, v_name)
    masters = [fmt.dequantize(ours[0], ours[1], SHAPE) if with_master else None for _ in range(2)]
    if with_master:
        masters[1] = masters[0].clone()
    for step, seed in ((1, 11), (2, 12), (3, None)):
        scalars = reference.adamw_scalars(step=step, **ADAM)
        torch.manual_seed(step)  # seed None: both draw their seed from torch's generator
        compiled.adamw_step_(*ours, masters[0], fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars,
                             rounding=rounding, seed=seed)
        torch.manual_seed(step)
        reference.adamw_step_(*theirs, masters[1], fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars,
                              rounding=rounding, seed=seed)
        _assert_same(ours, theirs)
        if with_master:
            assert torch.equal(masters[0], masters[1])


@pytest.mark.parametrize("name,weight_decay,m_name", [("fp8-block32", 0.0, "fp32"), ("int4-tensor", 0.05, "int8"),
                                                      ("fp8-row", 0.0, "bf16")])
def test_compiled_sgd_equals_the_eager_reference(name, weight_decay, m_name):
    fmt = FORMATS[name]
    ours, theirs = _state(fmt, m_name, None)[:4], _state(fmt, m_name, None)[:4]
    scalars = reference.sgd_scalars(lr=0.05, momentum=0.9, weight_decay=weight_decay)
    for seed in (3, 4):
        compiled.sgd_step_(*ours, None, fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars, rounding="stochastic",
                           seed=seed)
        reference.sgd_step_(*theirs, None, fmt=fmt, shape=torch.Size(SHAPE), scalars=scalars, rounding="stochastic",
                            seed=seed)
        _assert_same(ours, theirs)


def test_compiled_plain_steps_equal_the_eager_reference():
    def tensors(seed):
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(n, generator=gen) for n in ((7,), (300,), (5, 6))] for _ in range(4)]

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
    # 8-bit m and a factored v (the (5, 6) matrix; 1-D tensors keep a full v)
    shapes = [(7,), (5, 6)]
    results = []
    for backend in (compiled, reference):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen) for s in shapes]
        ms = [reference.Moment(states.INT8_STATE, states.INT8_STATE.allocate(s, "cpu")) for s in shapes]
        vs = [reference.Moment(f, f.allocate(s, "cpu"))
              for s in shapes for f in [states.for_shape(states.FACTORED_STATE, s)]]
        for step in (1, 2):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            backend.plain_adamw_steps_(params, grads, ms, vs, scalars=reference.adamw_scalars(step=step, **ADAM),
                                       seeds=[5 * step, 5 * step + 1])
        results.append([params, ms, vs])
    for a, b in zip(*results, strict=True):
        _assert_same(a, b)


def test_stochastic_rounding_with_counter_uniforms_is_unbiased():
    """Many seeds quantizing the same values: the mean stored value approaches the input."""
    fmt = eco.FP8(group_size=32)
    x = torch.linspace(-1, 1, 64).reshape(2, 32) * 0.37
    total = torch.zeros_like(x, dtype=torch.float64)
    n = 400
    for seed in range(n):
        key = rng.key(seed * 7919)
        codes, scales = fmt.quantize(x, "stochastic", uniform=lambda y, key=key: rng.uniform(key, y.shape))
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
    monkeypatch.setattr(compiled, "_compiled", lambda *a: broken)
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
    """Several eco.AdamW steps, stochastic rounding, 8-bit m and factored v (the weights) next to a plain
    bias with its 1-D state: backend='compiled' equals backend='reference' bit for bit."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 64) * 0.1
    models = []
    for _ in range(2):
        lin = torch.nn.Linear(64, 16)
        lin.weight.data.copy_(w0)
        lin.bias.data.zero_()
        models.append(eco.quantize_(lin, eco.FP8()))
    opts = [eco.AdamW(m.parameters(), lr=1e-2, momentum="int8", second_moment="factored", seed=3, backend=backend)
            for m, backend in zip(models, ("compiled", "reference"), strict=True)]
    for _ in range(3):
        grads = [torch.randn(16, 64), torch.randn(16)]
        for m, opt in zip(models, opts, strict=True):
            m.weight.grad, m.bias.grad = (g.clone() for g in grads)
            opt.step()
    assert_same_training_state(models[1], opts[1], models[0], opts[0])
