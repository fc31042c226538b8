"""Many small quantized weights in few launches (``eco.kernels.adamw_steps_``/``sgd_steps_``).

The multi-tensor kernel runs the same tile code as the single-tensor kernel,
so a grouped step must give exactly the bits of one step per weight with the
same seeds: codes, scales, moments and master copies. Each test also checks
that the grouped path really ran (a ``multi/`` launch), so that a silent
fallback to one launch per weight cannot pass for grouping.
"""

from __future__ import annotations

import math

import pytest
import torch

import eco
from eco import kernels, reference
from eco.kernels import eco_step, launcher, specs
from tests.helpers import FORMATS, assert_bits_equal, assert_same_training_state, bits
from tests.test_kernels import assert_states_equal, clone_state, random_moment, to_device

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ADAM = dict(lr=0.1, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)  # large steps: INT4 codes move too
SGD = dict(lr=0.5, momentum=0.9, weight_decay=0.01)
LARGE = 1024  # MULTI_TENSOR_MAX_NUMEL in these tests: a "large" weight the interpreter still runs quickly


@pytest.fixture
def launches(monkeypatch):
    """The spec names of every kernel launch (the launches still run)."""
    names = []
    real = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: (names.append(spec.name), real(spec, grid, **a)))
    monkeypatch.setattr(launcher, "MULTI_TENSOR_MAX_NUMEL", LARGE)
    return names


def shapes_for(fmt, pair=("bf16", "bf16")):
    """Different shapes (a 3-D expert tensor among them) and one that cannot be grouped.

    Row/tensor formats: a last dimension of 24 (not a multiple of 16). Block and
    group formats need multiples of 32, so their odd one out is a weight over
    ``LARGE`` elements; with 8-bit or factored states (whose blocks of 128 must
    not straddle the rows of a weight tiled as one flat row) the grouped ones
    have rows of 128 and 256 and the odd one rows of 96.
    """
    if pair[0] in ("int8", "fp8") or pair[1] in ("fp8", "factored"):
        grouped = [(2, 128), (2, 2, 128), (1, 256), (3, 128)]
        odd = (2, 24) if fmt.group_size is None else (2, 96)
    else:
        grouped = [(2, 32), (2, 2, 32), (1, 64), (3, 32)]
        odd = (2, 24) if fmt.group_size is None else (2, LARGE // 2 + 32)
    return [torch.Size(s) for s in grouped[:2] + [odd] + grouped[2:]]


def make_weights(fmt, shapes, optimizer, pair, grad_dtype, master, seed=0):
    """Per weight: codes, scales, grad, moment(s) (``reference.Moment``s of the ``pair``'s formats, holding random
    values) and master (or None), each its own allocation."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen)
        codes, scales = fmt.quantize(w)
        state = dict(codes=codes, scales=scales, grad=torch.randn(shape, generator=gen).to(grad_dtype),
                     exp_avg=random_moment(pair[0], "m", shape, gen, 0.1))
        if optimizer == "adamw":
            state["exp_avg_sq"] = random_moment(pair[1], "v", shape, gen, 1e-3)
        if master:
            state["master"] = fmt.dequantize(codes, scales, shape) + 1e-3
        weights.append({k: to_device(v) for k, v in state.items()})
    return weights


def clone(weights):
    return [clone_state(w) for w in weights]


def step_each(optimizer, fmt, shapes, weights, step, rounding, seeds):
    """The per-weight path: one ``adamw_step_``/``sgd_step_`` call per weight."""
    for w, shape, seed in zip(weights, shapes, seeds, strict=True):
        if optimizer == "adamw":
            kernels.adamw_step_(w["codes"], w["scales"], w["grad"], w["exp_avg"], w["exp_avg_sq"], w.get("master"),
                                fmt=fmt, shape=shape, scalars=reference.adamw_scalars(step=step, **ADAM),
                                rounding=rounding, seed=seed)
        else:
            kernels.sgd_step_(w["codes"], w["scales"], w["grad"], w["exp_avg"], w.get("master"), fmt=fmt, shape=shape,
                              scalars=reference.sgd_scalars(**SGD), rounding=rounding, seed=seed)


def step_grouped(optimizer, fmt, shapes, weights, step, rounding, seeds):
    lists = {k: [w.get(k) for w in weights] for k in ("codes", "scales", "grad", "exp_avg", "exp_avg_sq", "master")}
    if optimizer == "adamw":
        kernels.adamw_steps_(lists["codes"], lists["scales"], lists["grad"], lists["exp_avg"], lists["exp_avg_sq"],
                             lists["master"], fmt=fmt, shapes=shapes,
                             scalars=reference.adamw_scalars(step=step, **ADAM), rounding=rounding, seeds=seeds)
    else:
        kernels.sgd_steps_(lists["codes"], lists["scales"], lists["grad"], lists["exp_avg"], lists["master"], fmt=fmt,
                           shapes=shapes, scalars=reference.sgd_scalars(**SGD), rounding=rounding, seeds=seeds)


def assert_weights_equal(actual, expected):
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert_states_equal({f"weight {i} {k}": v for k, v in a.items()}, {f"weight {i} {k}": v for k, v in b.items()})


def passes(fmt) -> int:
    return 2 if fmt.group_size is None else 1


GROUPED_CASES = ([(name, rounding, optimizer, ("bf16", "bf16") if optimizer == "adamw" else ("bf16", None))
                  for name in FORMATS for rounding in ("nearest", "stochastic") for optimizer in ("adamw", "sgd")]
                 + [(name, "stochastic", "adamw", ("int8", "factored")) for name in FORMATS]
                 + [(name, "stochastic", "sgd", ("int8", None)) for name in ("fp8-row", "int4-group32")])


@pytest.mark.parametrize("name, rounding, optimizer, pair", GROUPED_CASES,
                         ids=[f"{n}-{r}-{o}-{specs.states_tag(p)}" for n, r, o, p in GROUPED_CASES])
def test_grouped_step_equals_one_step_per_weight(name, rounding, optimizer, pair, launches):
    """Two steps, bf16 gradients: every stored tensor bit-identical to the per-weight path. The state pairs
    with multi-tensor kernels group four weights into one launch per pass (and, for a factored v, one
    statistics and one finalize launch); the others (SGD's int8 m) take one launch per weight."""
    fmt = FORMATS[name]
    shapes = shapes_for(fmt, pair)
    weights = make_weights(fmt, shapes, optimizer, pair, torch.bfloat16, master=False)
    each, grouped = clone(weights), clone(weights)
    multi = pair in specs.MULTI_STATES[optimizer]
    factored = 2 if pair[1] == "factored" else 0
    for step in (1, 2):
        seeds = [1000 * step + i for i in range(len(shapes))]
        step_each(optimizer, fmt, shapes, each, step, rounding, seeds)
        del launches[:]
        step_grouped(optimizer, fmt, shapes, grouped, step, rounding, seeds)
        assert_weights_equal(grouped, each)
        # four weights in one group (one launch per pass), the odd one on its own
        assert sum(n.startswith("multi/") for n in launches) == (passes(fmt) if multi else 0), launches
        expected = 2 * (passes(fmt) + factored) if multi else len(shapes) * passes(fmt)
        assert len(launches) == expected, launches
    assert all(not torch.equal(bits(a["exp_avg"].tensors[0]), bits(b["exp_avg"].tensors[0]))
               for a, b in zip(each, weights, strict=True))


@pytest.mark.parametrize("name, pair, rounding", [("fp8-row", ("fp32", "fp32"), "nearest"),
                                                  ("int4-group32", ("fp32", "fp32"), "nearest"),
                                                  ("int4-tensor", ("int8", "factored"), "stochastic")])
def test_grouped_step_with_master_weights(name, pair, rounding, launches):
    """The master-weight baseline through the multi kernel (fp32 gradients): masters equal too."""
    fmt = FORMATS[name]
    shapes = shapes_for(fmt, pair)
    weights = make_weights(fmt, shapes, "adamw", pair, torch.float32, master=True, seed=1)
    each, grouped = clone(weights), clone(weights)
    seeds = [50 + i for i in range(len(shapes))]
    step_each("adamw", fmt, shapes, each, 1, rounding, seeds)
    del launches[:]
    step_grouped("adamw", fmt, shapes, grouped, 1, rounding, seeds)
    assert_weights_equal(grouped, each)
    assert sum(n.startswith("multi/") and n.endswith("/master") for n in launches) == passes(fmt), launches
    assert not torch.equal(each[0]["master"], weights[0]["master"])


@pytest.mark.parametrize("name", list(FORMATS))
def test_launch_count_many_small_experts(name, monkeypatch):
    """8 small expert matrices of one format: one launch (two for row/tensor scales); a ragged one
    (last dim not a multiple of 16, or codes that are not 16-byte aligned for block/group formats) and a
    large one get their own; the multi launch has one program per tile of the eight. A non-contiguous
    gradient is copied and grouped."""
    fmt = FORMATS[name]
    monkeypatch.setattr(launcher, "MULTI_TENSOR_MAX_NUMEL", LARGE)
    recorded = []
    monkeypatch.setattr(launcher, "launch", lambda spec, grid, **a: recorded.append((spec, grid)))
    experts = [torch.Size((16, 32))] * 6 + [torch.Size((2, 8, 32))] * 2
    odd = torch.Size((4, 24)) if fmt.group_size is None else torch.Size((4, 32))
    large = torch.Size((8, LARGE // 8 + 32))
    shapes = experts + [odd, large]
    weights = make_weights(fmt, shapes, "adamw", ("bf16", "bf16"), torch.bfloat16, master=False)
    if fmt.group_size is not None:
        codes = weights[8]["codes"]
        unaligned = torch.empty(codes.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(codes.shape)
        weights[8]["codes"] = unaligned.copy_(codes.view(torch.uint8)).view(codes.dtype)
        assert weights[8]["codes"].data_ptr() % 16
    weights[0]["grad"] = weights[0]["grad"].t().contiguous().t()  # same values, column-major
    assert not weights[0]["grad"].is_contiguous()
    step_grouped("adamw", fmt, shapes, weights, 1, "nearest", [None] * len(shapes))
    multi = [(spec, grid) for spec, grid in recorded if spec.meta["kernel"] == "step_multi"]
    single = [spec for spec, _ in recorded if spec.meta["kernel"] == "step"]
    assert len(multi) == passes(fmt) and len(single) == 2 * passes(fmt), [s.name for s, _ in recorded]
    block = multi[0][0].constexprs["BLOCK"]
    if fmt.group_size is None:  # row/tensor scales: tiles of rows
        tiles = sum(math.prod(s[:-1]) * -(-s[-1] // block) for s in experts)
    else:  # block/group scales: a weight is one flat row, its narrow rows share tiles
        tiles = sum(-(-math.prod(s) // block) for s in experts)
    assert all(grid == (tiles,) for _, grid in multi)
    assert [spec.meta["pass"] for spec, _ in multi] == ([0, 1] if passes(fmt) == 2 else [1])


def test_launch_table_layout():
    """Per program ``[tensor, row, tile]``, per tensor the geometry, the stream keys and each pointer's element
    offset from the first tensor's."""
    fmt = eco.FP8()
    shapes = [torch.Size((2, 32)), torch.Size((3, 2, 16))]
    weights = make_weights(fmt, shapes, "adamw", ("int8", "factored"), torch.float32, master=False)
    f32 = launcher.dummy(torch.float32, weights[0]["codes"].device)
    items = [(s, w["codes"].view(torch.uint8), w["scales"], w["grad"], w["exp_avg"].tensors[0],
              w["exp_avg"].tensors[1], f32, f32, *w["exp_avg_sq"].tensors, f32) for s, w in zip(shapes, weights,
                                                                                               strict=True)]
    table, stream_slots, workspace, n_programs = launcher.step_table(fmt, 2048, items, [1, 3])
    assert n_programs == 2 + 6
    programs = table[:3 * n_programs].reshape(-1, 3).tolist()
    assert programs == [[0, 0, 0], [0, 1, 0]] + [[1, r, 0] for r in range(6)]
    entry = table[3 * n_programs + eco_step.MULTI_TENSOR_WORDS.value:].tolist()
    w0, w1 = weights

    def offset(key, part=0):
        a, b = (w[key].tensors[part] if isinstance(w[key], reference.Moment) else w[key] for w in (w0, w1))
        return (b.data_ptr() - a.data_ptr()) // a.element_size()

    word = {name: entry[getattr(eco_step, name).value] for name in dir(eco_step) if name.startswith("STEP_")
            and not name.startswith(("STEP_PROGRAM", "STEP_STREAM"))}
    assert [word["STEP_N_COLS"], word["STEP_CODE_COLS"], word["STEP_ROWS_PER_SCALE"], word["STEP_N_SCALE_GROUPS"],
            word["STEP_MATRIX_ROWS"], word["STEP_ROW_LENGTH"]] == [16, 16, 1, 6, 2, 16]
    assert [word[f"STEP_{s}_{w}"] for s in "WMV" for w in ("STRIDE", "BASE")] == [0] * 6  # written per step
    assert word["STEP_CODES"] == offset("codes") and word["STEP_SCALES"] == offset("scales")
    assert word["STEP_WORKSPACE"] == 4 and word["STEP_GMAX"] == 1  # after tensor 0's 2 x 2 and its one matrix
    assert [word["STEP_GRAD"], word["STEP_EXP_AVG"], word["STEP_EXP_AVG_SCALE"]] == [
        offset("grad"), offset("exp_avg"), offset("exp_avg", 1)]
    assert [word["STEP_EXP_AVG_SQ"], word["STEP_EXP_AVG_SQ_SCALE"], word["STEP_MASTER"]] == [0, 0, 0]  # dummies
    assert [word["STEP_V_ROW"], word["STEP_V_COL"], word["STEP_V_MEAN"]] == [
        offset("exp_avg_sq", i) for i in range(3)]
    assert workspace == 2 * (2 + 6)
    assert stream_slots[1][0] == 3 * n_programs + eco_step.MULTI_TENSOR_WORDS.value + eco_step.STEP_W_STRIDE.value


# ---------------------------------------------------------------- through the optimizer
class Experts(torch.nn.Module):
    """A MoE-like layer whose experts are separate nn.Linear modules (HF Mixtral/Qwen-MoE style).

    Few rows per expert: the interpreter runs one program per row.
    """

    def __init__(self, n_experts=8, hidden=32, out=4):
        super().__init__()
        self.router = torch.nn.Linear(hidden, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, out, bias=False) for _ in range(n_experts))

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)
        out = sum(gates[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return torch.tanh(out).square().mean()


def train(fmt, backend, steps, rounding="nearest", seed=0, hidden=32, **states_):
    torch.manual_seed(0)
    model = eco.quantize_(Experts(hidden=hidden).to(DEVICE), fmt,
                          filter_fn=lambda name, module: not name.startswith("router"))
    opt = eco.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, rounding=rounding, backend=backend, seed=seed,
                    **(states_ or dict(state_dtype=torch.bfloat16)))
    data = torch.randn(steps, 4, hidden, device=DEVICE)
    for x in data:
        opt.zero_grad()
        model(x).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", ["fp8-row", "int4-group32"])
def test_optimizer_groups_quantized_experts_and_equals_reference(name, launches):
    """eco.AdamW(backend='triton') == backend='reference' over 3 steps (nearest), in few launches per step."""
    fmt = FORMATS[name]
    ref_model, ref_opt = train(fmt, "reference", 3)
    del launches[:]
    ker_model, ker_opt = train(fmt, "triton", 3)
    quantized = [p for p in ker_model.parameters() if isinstance(p, eco.QuantizedTensor)]
    assert len(quantized) == 8
    assert_same_training_state(ref_model, ref_opt, ker_model, ker_opt)
    # per step: the 8 expert matrices in one launch per pass, the (plain) router weight in one more
    assert len(launches) == 3 * (passes(fmt) + 1), launches
    assert sum(n.startswith("multi/") for n in launches) == 3 * passes(fmt)


@pytest.mark.parametrize("name", ["fp8-row", "int4-group32"])
def test_optimizer_groups_experts_with_8bit_momentum_and_factored_v(name, launches):
    """``momentum="int8", second_moment="factored"`` (stochastic rounding): bit-identical to the reference; per
    step the 8 experts share one launch per pass and one statistics and one finalize launch, the (plain)
    router takes the step kernel's tiles and its own two."""
    fmt = FORMATS[name]
    kwargs = dict(rounding="stochastic", hidden=128, momentum="int8", second_moment="factored")
    ref_model, ref_opt = train(fmt, "reference", 2, **kwargs)
    del launches[:]
    ker_model, ker_opt = train(fmt, "triton", 2, **kwargs)
    assert_same_training_state(ref_model, ref_opt, ker_model, ker_opt)
    assert len(launches) == 2 * (passes(fmt) + 2 + 3), launches
    assert sum(n.startswith("multi/") for n in launches) == 2 * passes(fmt)
    assert sum(n.startswith("factored_stats") for n in launches) == 2 * 2


def test_optimizer_draws_one_seed_per_weight_in_parameter_order(launches):
    """Stochastic rounding: the grouped optimizer step equals per-weight kernel steps whose seeds come from the
    optimizer's generator in parameter order (so runs stay reproducible and equal to the per-weight path)."""
    fmt = FORMATS["fp8-block32"]
    torch.manual_seed(0)
    model = eco.quantize_(Experts(n_experts=3).to(DEVICE), fmt,
                          filter_fn=lambda name, module: not name.startswith("router"))
    params = [p for p in model.parameters() if isinstance(p, eco.QuantizedTensor)]
    opt = eco.AdamW(params, lr=1e-2, weight_decay=0.1, rounding="stochastic", backend="triton", seed=7)
    model(torch.randn(4, 32, device=DEVICE)).backward()
    before = [dict(codes=p.codes.clone(), scales=p.scales.clone(), grad=p.grad.clone(),
                   exp_avg=torch.zeros(p.shape, device=DEVICE), exp_avg_sq=torch.zeros(p.shape, device=DEVICE))
              for p in params]
    expected = clone(before)
    generator = torch.Generator().manual_seed(7)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator).item()) for _ in params]
    del launches[:]
    opt.step()
    assert sum(n.startswith("multi/") for n in launches) == 1 and len(launches) == 1, launches
    scalars = reference.adamw_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    for w, p, seed in zip(expected, params, seeds, strict=True):
        kernels.adamw_step_(w["codes"], w["scales"], w["grad"], w["exp_avg"], w["exp_avg_sq"], None, fmt=fmt,
                            shape=p.shape, scalars=scalars, rounding="stochastic", seed=seed)
        assert_bits_equal(p.codes, w["codes"], "codes")
        assert_bits_equal(p.scales, w["scales"], "scales")
        assert_bits_equal(opt.state[p]["exp_avg"], w["exp_avg"], "exp_avg")
    # another seed gives other bits, so the check above can fail (e.g. seeds drawn in another order)
    other = clone(before)[0]
    kernels.adamw_step_(other["codes"], other["scales"], other["grad"], other["exp_avg"], other["exp_avg_sq"], None,
                        fmt=fmt, shape=params[0].shape, scalars=scalars, rounding="stochastic", seed=seeds[1])
    assert not torch.equal(bits(other["codes"]), bits(params[0].codes))
