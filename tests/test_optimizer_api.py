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


# ---------------------------------------------------------------- issue 14: what torch.optim users expect
def full_snapshot(model, opt):
    """:func:`snapshot` plus the generator: a step that fails must not even draw a seed."""
    return {**snapshot(model, opt), "generator": opt.generator.get_state()}


def model_with_extras():
    """A quantized MLP plus the plain parameters real models carry: a 0-d one (CLIP's logit_scale) and a float64 one."""
    model = quantized_mlp()
    model.logit_scale = nn.Parameter(torch.tensor(2.5))
    model.extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    return model


def extras_backward(model):
    x, y = DATA
    loss = nn.functional.mse_loss(model(x) * model.logit_scale, y) + model.extra.pow(2).sum()
    loss.backward()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_dim_parameter_steps_like_torch(name):
    """Item 5: a 0-d parameter used to crash the step after the quantized weights had already moved."""
    model = model_with_extras()
    opt = OPTIMIZERS[name](model.parameters(), rounding="nearest")
    ref = model.logit_scale.detach().clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    momentum = torch.zeros(())
    for _ in range(3):
        opt.zero_grad()
        extras_backward(model)
        ref.grad = model.logit_scale.grad.clone()
        opt.step()
        if name == "adamw":
            ref_opt.step()
        else:  # EMA momentum from zero (torch's SGD starts its buffer at the first gradient)
            momentum = 0.9 * momentum + 0.1 * ref.grad
            ref.data -= 0.1 * momentum
    state = opt.state[model.logit_scale]
    assert state["step"] == 3 and state[opt.moment_names[0]].dim() == 0
    torch.testing.assert_close(model.logit_scale.detach(), ref.detach(), rtol=1e-6, atol=0)


def _rounding_set_later(model, opt):
    opt.param_groups[1]["rounding"] = "up"
    return ValueError, "rounding must be one of"


def _lr_tensor_set_later(model, opt):
    opt.param_groups[1]["lr"] = torch.tensor([1e-3, 1e-3])
    return ValueError, "Tensor lr must be 1-element"


def _nan_lr_set_later(model, opt):
    opt.param_groups[1]["lr"] = float("nan")
    return ValueError, "lr must be >= 0"


def _unavailable_backend(model, opt):
    opt.backend = "triton"  # the kernels take fp32/bf16/fp16 parameters: not the float64 one
    return RuntimeError, "backend='triton'"


def _parameter_reshaped(model, opt):
    model.extra.data = torch.randn(5, dtype=torch.float64)
    return RuntimeError, "changed after its first step"


def _master_weights_set_later(model, opt):
    opt.param_groups[1]["master_weights"] = True  # the quantized weight of group 1 has no master copy
    return RuntimeError, "changed after its first step"


def _state_dtype_set_later(model, opt):
    opt.state_dtype = torch.bfloat16
    return RuntimeError, "changed after its first step"


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("spoil", [_rounding_set_later, _lr_tensor_set_later, _nan_lr_set_later,
                                   _unavailable_backend, _parameter_reshaped, _master_weights_set_later,
                                   _state_dtype_set_later])
def test_a_step_that_fails_changes_nothing(name, spoil):
    """Item 5: everything that can be checked is checked for all groups before any state changes."""
    model = model_with_extras()
    named = dict(model.named_parameters())
    late = [named["extra"], named["4.weight"], named["4.bias"]]
    opt = OPTIMIZERS[name]([{"params": [p for p in model.parameters() if all(p is not q for q in late)]},
                            {"params": late}], seed=0)
    opt.zero_grad()
    extras_backward(model)
    opt.step()
    opt.zero_grad()
    extras_backward(model)
    error, message = spoil(model, opt)
    before = full_snapshot(model, opt)
    with pytest.raises(error, match=message):
        opt.step()
    after = full_snapshot(model, opt)
    if spoil is _parameter_reshaped:
        del before["extra"], after["extra"]
    assert_identical(before, after)


def test_optimizer_built_before_quantize_refuses_to_step():
    """Item 7: the replaced Parameters would never train (their grads stay None) and nothing said so."""
    model = mlp()
    opt = eco.AdamW(model.parameters())
    eco.quantize_(model, eco.FP8())
    before = snapshot(model, opt)
    train_steps_error = None
    try:
        train_steps(model, opt, 1)
    except RuntimeError as error:
        train_steps_error = str(error)
    assert train_steps_error is not None and "Build the optimizer after eco.quantize_" in train_steps_error
    assert_identical(before, snapshot(model, opt))
    assert not opt.state
    stale = [p for g in opt.param_groups for p in g["params"]]
    with pytest.raises(RuntimeError, match="Build the optimizer after eco.quantize_"):
        eco.SGD(stale)
    train_steps(model, eco.AdamW(model.parameters()), 1)  # built after quantize_: fine


def _torch_trained(model, opt_cls, **kw):
    opt = opt_cls(model.parameters(), **kw)
    train_steps(model, opt, 3)
    return opt


def test_torch_adamw_state_dict_loads_into_eco_adamw_and_continues_like_torch():
    """Item 9 (README's migration path): missing eco options keep their configured values, torch's tensor step
    becomes a count, and the run continues as torch's would (plain parameters: the same AdamW)."""
    model = mlp()
    torch_opt = _torch_trained(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    twin = copy.deepcopy(model)
    opt = eco.AdamW(twin.parameters(), lr=5.0, rounding="nearest", seed=0)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as torch, loading does not copy the tensors
    group = opt.param_groups[0]
    assert group["lr"] == 1e-2 and group["rounding"] == "nearest" and group["master_weights"] is False
    assert not any(k in group for k in ("foreach", "fused", "amsgrad", "maximize", "capturable"))
    assert all(st["step"] == 3 and st["exp_avg"].dtype == torch.float32 for st in opt.state.values())
    train_steps(model, torch_opt, 3)
    train_steps(twin, opt, 3)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # a quantized model takes the torch state the same way
    quantized = eco.quantize_(mlp(), eco.FP8())
    eco_opt = eco.AdamW(quantized.parameters())
    eco_opt.load_state_dict(torch_opt.state_dict())
    train_steps(quantized, eco_opt, 1)
    assert all(st["step"] == 7 for st in eco_opt.state.values())


@pytest.mark.parametrize("torch_kwargs, message", [
    (dict(amsgrad=True), "amsgrad=True"),
    (dict(maximize=True), "maximize=True"),
])
def test_torch_adamw_options_eco_lacks_are_refused(torch_kwargs, message):
    model = mlp()
    sd = _torch_trained(model, torch.optim.AdamW, **torch_kwargs).state_dict()
    opt = eco.AdamW(model.parameters())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert not opt.state and "amsgrad" not in opt.param_groups[0]


def test_torch_sgd_state_dict_loads_only_with_the_same_momentum_rule():
    model = mlp()
    ema = _torch_trained(model, torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.9)
    twin = copy.deepcopy(model)
    opt = eco.SGD(twin.parameters(), rounding="nearest")
    opt.load_state_dict(copy.deepcopy(ema.state_dict()))
    train_steps(model, ema, 2)
    train_steps(twin, opt, 2)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    plain = _torch_trained(mlp(), torch.optim.SGD, lr=0.1, momentum=0.9)  # dampening 0: another momentum
    with pytest.raises(ValueError, match="dampening=0"):
        eco.SGD(mlp().parameters()).load_state_dict(plain.state_dict())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_keep_every_setting_and_step_alike(name):
    """Item 8: copy.deepcopy and pickle dropped generator, state_dtype, nonfinite, backend and skipped_steps."""
    import pickle

    model = quantized_mlp(eco.INT4(group_size=16))  # plain pickle of FP8 codes is issue 14 item 12 (qparam)
    opt = OPTIMIZERS[name](model.parameters(), state_dtype=torch.bfloat16, nonfinite="raise", backend="reference",
                           seed=3)
    train_steps(model, opt, 2)
    opt.skipped_steps = 4
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert {k for k in vars(copied) if not k.startswith("_")} == {k for k in vars(opt) if not k.startswith("_")}
        assert (copied.state_dtype, copied.nonfinite, copied.backend, copied.skipped_steps) == (
            torch.bfloat16, "raise", "reference", 4)
        assert torch.equal(copied.generator.get_state(), opt.generator.get_state())
        assert copied.generator is not opt.generator
    twin_model, twin = copy.deepcopy((model, opt))  # one copy: the twin optimizer steps the twin model
    train_steps(model, opt, 2)
    train_steps(twin_model, twin, 2)
    assert_identical(snapshot(model, opt), snapshot(twin_model, twin))


def test_named_parameters_and_weights_only_load():
    """Item 8: eco.AdamW(model.named_parameters()) raised; torch 2.13 stores param_names."""
    model = quantized_mlp()
    opt = eco.AdamW(model.named_parameters(), seed=0)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    train_steps(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = eco.AdamW(model.parameters(), seed=1)  # unnamed: takes the saved names
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    assert_identical(snapshot(model, opt), snapshot(model, fresh))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("lr_shape", [(), (1,), (1, 1)])
def test_tensor_lr_steps_as_the_float(name, lr_shape):
    """Item 8/5: torch accepts a 1-element tensor lr of any dimension (a 2-D one broke the plain step)."""
    lr = 2.0**-7 if name == "adamw" else 2.0**-3  # exact in fp32 (a tensor lr) and in fp64 (a float lr)
    model_a, model_b = quantized_mlp(), quantized_mlp()
    opt_a = OPTIMIZERS[name](model_a.parameters(), lr=lr, seed=0)
    opt_b = OPTIMIZERS[name](model_b.parameters(), lr=torch.tensor(lr).reshape(lr_shape), seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)  # writes into the tensor in place
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    train_steps(model_a, opt_a, 3, sched_a)
    train_steps(model_b, opt_b, 3, sched)
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)
    assert_identical(snapshot(model_a, opt_a), snapshot(model_b, opt_b))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_complex_parameters_step_as_their_real_view(name):
    """Item 8: a complex parameter was refused as if it were an integer one; torch steps view_as_real."""
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z).detach().clone().requires_grad_(True)
    opt_z, opt_r = OPTIMIZERS[name]([z], seed=0), OPTIMIZERS[name]([r], seed=0)
    for _ in range(3):
        g = torch.randn(4, 3, 2)
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        opt_z.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


def test_nan_eps_and_weight_decay_are_refused():
    """Item 13: torch refuses them; eco accepted them."""
    params = list(mlp().parameters())
    for kwargs in (dict(eps=float("nan")), dict(weight_decay=float("nan")), dict(eps=float("inf"))):
        with pytest.raises(ValueError, match="must be"):
            eco.AdamW(params, **kwargs)
    with pytest.raises(ValueError, match="weight_decay"):
        eco.SGD(params, weight_decay=float("nan"))


def test_saved_state_of_another_format_is_refused_and_torch_states_convert_only_when_exact():
    """Item 13: resuming silently replaced the configured state_dtype with the saved one. An eco state_dict names
    its state formats: another one is refused. A torch.optim state_dict's states convert only when that is exact."""
    model = quantized_mlp()
    low = eco.AdamW(model.parameters(), state_dtype=torch.bfloat16)
    train_steps(model, low, 2)
    high = eco.AdamW(model.parameters(), state_dtype=torch.float32)
    with pytest.raises(ValueError, match="saved with state formats"):
        high.load_state_dict(low.state_dict())
    assert not high.state

    plain = mlp().bfloat16()
    torch_opt = torch.optim.AdamW(plain.parameters())
    x, y = DATA
    nn.functional.mse_loss(plain(x.bfloat16()), y.bfloat16()).backward()
    torch_opt.step()
    fp32 = eco.AdamW(plain.parameters(), state_dtype=torch.float32)
    fp32.load_state_dict(torch_opt.state_dict())  # bfloat16 -> float32 is exact: the configured dtype wins
    for p in plain.parameters():
        assert fp32.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(fp32.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"].float())
    rounded = {**fp32.state_dict(), "param_groups": [
        {k: v for k, v in g.items() if not k.startswith("eco_")} for g in fp32.state_dict()["param_groups"]]}
    again = eco.AdamW(plain.parameters(), state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="converting would round"):
        again.load_state_dict(rounded)  # float32 states (no eco entries, as torch saves them) into bfloat16
    assert not again.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "master"])
def test_saved_state_with_nan_or_inf_is_refused(bad, key):
    """Issue 14 item 1: a NaN in a saved exp_avg wiped weight matrices on the next step."""
    model = quantized_mlp()
    opt = eco.AdamW(model.parameters(), master_weights=True, seed=0)
    train_steps(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key][0, 0] = bad
    before = full_snapshot(model, opt)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        opt.load_state_dict(sd)
    assert_identical(before, full_snapshot(model, opt))
