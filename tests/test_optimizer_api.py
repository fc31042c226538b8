"""eco optimizers behave as PyTorch optimizers: groups, zero_grad, closure, schedulers, state_dict resume."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import eco
from tests.helpers import mlp

OPTIMIZERS = {
    "adamw": lambda params, **kw: eco.AdamW(params, lr=kw.pop("lr", 1e-2), weight_decay=0.1, **kw),
    "sgd": lambda params, **kw: eco.SGD(params, lr=kw.pop("lr", 0.1), momentum=0.9, **kw),
}
DATA = torch.randn(32, 16), torch.randn(32, 4)


def quantized_mlp(fmt=None, seed=0):
    model = mlp(seed=seed)
    return eco.quantize_(model, fmt or eco.FP8())


def train_steps(model, opt, steps, sched=None):
    x, y = DATA
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(model, opt):
    """Every weight byte and every state tensor, for bit-identity comparisons."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, eco.QuantizedTensor):
            out[name + ".codes"] = p.codes.view(torch.uint8).clone()
            out[name + ".scales"] = p.scales.clone()
        else:
            out[name] = p.detach().clone()
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            out[f"state{i}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_groups_with_different_lr(name):
    model = quantized_mlp()
    first, last = model[0], model[-1]
    opt = OPTIMIZERS[name]([
        {"params": first.parameters(), "lr": 0.0},
        {"params": last.parameters()},
    ], rounding="nearest")
    before_first = first.weight.dequantize().clone()
    before_last = last.weight.dequantize().clone()
    train_steps(model, opt, 3)
    assert torch.equal(first.weight.dequantize(), before_first)   # lr 0: nothing moves
    assert not torch.equal(last.weight.dequantize(), before_last)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] > 0


def test_add_param_group_and_validation():
    model = quantized_mlp()
    opt = eco.AdamW(model[0].parameters(), lr=1e-2)
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-3, "rounding": "nearest"})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["rounding"] == "nearest"
    assert opt.param_groups[1]["betas"] == opt.defaults["betas"]
    train_steps(model, opt, 1)
    assert model[2].weight in opt.state
    with pytest.raises(ValueError, match="rounding must be one of"):
        opt.add_param_group({"params": model[4].parameters(), "rounding": "up"})
    with pytest.raises(ValueError, match="lr must be >= 0"):
        eco.AdamW(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        eco.AdamW(model.parameters(), betas=(1.0, 0.9))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = quantized_mlp()
    opt = eco.AdamW(model.parameters())
    train_steps(model, opt, 1)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any() and type(p.grad) is torch.Tensor


def test_closure_is_called_and_its_loss_returned():
    model = quantized_mlp()
    opt = eco.SGD(model.parameters(), lr=0.1)
    x, y = DATA
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(float(loss))
        return loss

    first = opt.step(closure)
    assert calls and float(first) == calls[0]
    assert float(opt.step(closure)) < calls[0] * 1.5


def test_lr_scheduler_changes_the_step():
    torch.manual_seed(0)
    model = quantized_mlp()
    opt = eco.AdamW(model.parameters(), lr=1e-2, rounding="nearest")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)  # lr 0 after the first step
    train_steps(model, opt, 1, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = snapshot(model, opt)
    train_steps(model, opt, 2, sched)
    after = snapshot(model, opt)
    for k in frozen:
        if ".codes" in k or ".scales" in k:
            assert torch.equal(frozen[k], after[k]), k


def _resume_matches_uninterrupted(opt_factory, fmt, rounding):
    torch.manual_seed(0)
    model_a = quantized_mlp(fmt)
    model_b = copy.deepcopy(model_a)
    opt_a = opt_factory(model_a.parameters(), rounding=rounding, seed=11)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=10)
    train_steps(model_a, opt_a, 3, sched_a)

    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    train_steps(model_a, opt_a, 4, sched_a)

    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only=True: quantized weights are allow-listed
    model_b.load_state_dict(ckpt["model"])
    opt_b = opt_factory(model_b.parameters(), rounding=rounding, seed=999)  # the saved generator wins
    opt_b.load_state_dict(ckpt["opt"])
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=10)
    sched_b.load_state_dict(ckpt["sched"])
    train_steps(model_b, opt_b, 4, sched_b)
    assert_identical(snapshot(model_a, opt_a), snapshot(model_b, opt_b))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(group_size=16)], ids=str)
def test_state_dict_resume_is_bit_identical(name, rounding, fmt):
    _resume_matches_uninterrupted(lambda params, **kw: OPTIMIZERS[name](params, state_dtype=torch.bfloat16, **kw),
                                  fmt, rounding)


def test_state_dict_keeps_low_precision_state_and_master_copy():
    model = quantized_mlp()
    opt = eco.AdamW(model.parameters(), state_dtype=torch.bfloat16, master_weights=True)
    train_steps(model, opt, 2)
    sd = opt.state_dict()
    fresh = eco.AdamW(model.parameters(), state_dtype=torch.bfloat16, master_weights=True)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        if isinstance(p, eco.QuantizedTensor):
            assert fresh.state[p]["master"].dtype == torch.float32
            assert torch.equal(fresh.state[p]["master"], opt.state[p]["master"])


def test_optimizer_swaps_in_for_torch_adamw_on_a_plain_model():
    model = mlp()
    opt = eco.AdamW(model.parameters(), lr=1e-2)
    x, y = DATA
    first = float(nn.functional.mse_loss(model(x), y))
    train_steps(model, opt, 20)
    assert float(nn.functional.mse_loss(model(x), y)) < 0.9 * first
