"""Bad input gets a clear error (or a documented safe behaviour) and never corrupts weights."""

import io
import warnings

import pytest
import torch
import torch.nn as nn

import eco
from tests.helpers import mlp


def weights_of(model):
    return {n: (p.codes.view(torch.uint8).clone(), p.scales.clone()) if isinstance(p, eco.QuantizedTensor)
            else p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(before, after):
    for name, b in before.items():
        a = after[name]
        if isinstance(b, tuple):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name
        else:
            assert torch.equal(a, b), name


def one_backward(model):
    nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 4)).backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("opt_cls", [eco.AdamW, eco.SGD])
def test_nonfinite_gradient_skips_the_whole_step(bad, opt_cls):
    model = eco.quantize_(mlp(), eco.INT4(group_size=16))
    opt = opt_cls(model.parameters(), lr=0.1)
    one_backward(model)
    opt.step()  # states exist now
    state_before = {id(p): {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
                    for p, st in opt.state.items()}
    steps_before = [st["step"] for st in opt.state.values()]
    before = weights_of(model)
    opt.zero_grad()
    one_backward(model)
    model[2].weight.grad[1, 3] = bad
    with pytest.warns(RuntimeWarning, match="skipped a step with non-finite gradients"):
        opt.step()
    assert_unchanged(before, weights_of(model))
    for p, st in opt.state.items():
        for k, v in state_before[id(p)].items():
            assert torch.equal(st[k], v), k
    assert [st["step"] for st in opt.state.values()] == steps_before
    assert opt.skipped_steps == 1
    for p in model.parameters():
        if isinstance(p, eco.QuantizedTensor):
            assert torch.isfinite(p.dequantize()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_check_finds_one_bad_value_anywhere(dtype, bad):
    """The pre-step check (aminmax on CPU) sees a single bad value in any position, dtype and layout."""
    from eco.optim import _gradients_in_range as _all_finite

    def grads():  # an empty, a 0-d, a non-contiguous and a long gradient
        return [torch.empty(0, dtype=dtype), torch.tensor(0.5, dtype=dtype),
                torch.randn(6, 10).to(dtype)[:, ::3], torch.randn(5000).to(dtype)]

    assert _all_finite(grads())
    assert _all_finite([torch.empty(0, dtype=dtype)])
    for which, index in [(1, ()), (2, (5, 3)), (3, (0,)), (3, (4999,)), (3, (2500,))]:
        gs = grads()
        gs[which][index] = bad
        assert not _all_finite(gs), (which, index)


def test_nonfinite_gradient_can_raise_instead():
    model = eco.quantize_(mlp(), eco.FP8())
    opt = eco.AdamW(model.parameters(), nonfinite="raise")
    one_backward(model)
    model[0].weight.grad[0, 0] = float("nan")
    before = weights_of(model)
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    assert_unchanged(before, weights_of(model))
    assert not opt.state


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = eco.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="floating-point parameters"):
        eco.AdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="only floating tensors"):
        eco.QuantizedTensor.from_float(torch.zeros(3, 4, dtype=torch.int32), eco.FP8())


@pytest.mark.parametrize("opt_cls", [eco.AdamW, eco.SGD])
def test_lr_zero_moves_nothing_and_divides_by_nothing(opt_cls):
    model = eco.quantize_(mlp(), eco.FP8())
    opt = opt_cls(model.parameters(), lr=0.0, rounding="stochastic", seed=0)
    before = weights_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero RuntimeWarning either
        for _ in range(3):
            opt.zero_grad()
            one_backward(model)
            opt.step()
    assert_unchanged(before, weights_of(model))
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v.float()).all()


def test_group_size_that_does_not_divide_a_row():
    model = nn.Sequential(nn.Linear(100, 8))
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        eco.quantize_(model, eco.INT4(group_size=128))
    assert type(model[0].weight) is nn.Parameter  # untouched


def test_nonfinite_weights_cannot_be_quantized():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        eco.quantize_(lin, eco.FP8())


def test_optimizer_state_dict_from_another_model_is_refused():
    model = eco.quantize_(mlp(), eco.FP8())
    opt = eco.AdamW(model.parameters())
    one_backward(model)
    opt.step()
    sd = opt.state_dict()

    other = eco.quantize_(mlp(sizes=(16, 32, 32, 4)), eco.FP8())
    other_opt = eco.AdamW(other.parameters())
    with pytest.raises(ValueError, match="belongs to another model"):
        other_opt.load_state_dict(sd)
    assert not other_opt.state

    fewer = eco.AdamW(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="different number of parameter groups or parameters"):
        fewer.load_state_dict(sd)


def test_optimizer_state_dict_from_another_format_is_refused():
    model = eco.quantize_(mlp(), eco.FP8())
    opt = eco.AdamW(model.parameters())
    one_backward(model)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = eco.quantize_(mlp(), eco.INT4(group_size=16))
    other_opt = eco.AdamW(other.parameters())
    with pytest.raises(ValueError, match="saved with format"):
        other_opt.load_state_dict(torch.load(buf))


def test_bad_options_are_refused():
    params = list(eco.quantize_(mlp(), eco.FP8()).parameters())
    with pytest.raises(ValueError, match="state_dtype"):
        eco.AdamW(params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="nonfinite"):
        eco.AdamW(params, nonfinite="ignore")
    with pytest.raises(ValueError, match="needs momentum > 0"):
        eco.SGD(params, momentum=0.0)
    with pytest.raises(TypeError, match="eco format"):
        eco.quantize_(mlp(), "fp8")
