"""PyTorch's generic optimizer checks (upstream ``TestOptimRenewed``) for ``eco.AdamW`` and ``eco.SGD``.

Where this comes from
    PyTorch runs every optimizer of ``torch.testing._internal.common_optimizers.optim_db`` through the
    generic checks of class ``TestOptimRenewed`` in its ``test/test_optim.py``: the update goes the right
    way, with schedulers and param groups; a tensor lr steps as the float; complex parameters step as
    their real view; state_dict round trips (named or not, ``weights_only``, older state_dicts, step as
    a number); hooks; ``copy.deepcopy``; the errors each optimizer documents. This file runs the same
    checks, test for test under the same names, on the ``OptimizerInfo`` machinery that ships in the
    torch wheel, for eco's optimizer database (eco_optim_db.py) and, as a control that each check is
    torch's, for the wheel's own entries of ``torch.optim.AdamW`` and ``torch.optim.SGD``.

    Reference: ``test/test_optim.py`` at pytorch commit 2ad0fe8eb512504af9bf2a74069307fe0529b37b (read in
    the public fork Continuous-Integrator/pytorch), whose imports match ``common_optimizers`` of torch
    2.13; pinned to torch 2.13.0 (the version .ci/run installs). It is not a verbatim copy: the copy we
    could read is provided for reference, not for redistribution in this repository, so the checks are
    written here (pytest instead of unittest's device-type instantiation, CPU only).

What differs from upstream
    - The optimizer database: eco's two entries (plus torch's two as the control), nothing else.
    - ``kind``: checks that build their own weights rerun, for eco, with an FP8 and an INT4 quantized
      weight (bias and other parameters stay plain, as in a quantized model). Two optimizers that must
      step alike get the same ``seed`` (stochastic rounding draws from the optimizer's generator); where a
      check counts on 20 steps moving the weight, a quantized weight gets lr >= 0.05 (smaller steps never
      cross its quantization grid) and the check also asserts that the weight moved.
    - Checks that do not apply are listed in ``NOT_APPLICABLE`` and skipped with the reason.
"""

import functools
import io
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from torch.nn import Parameter
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import eco
from tests.upstream.eco_optim_db import eco_optim_db

DEVICE = "cpu"
TORCH_CONTROL = [info for info in optim_db if info.optim_cls in (torch.optim.AdamW, torch.optim.SGD)]
ALL_INFOS = [*eco_optim_db, *TORCH_CONTROL]
QUANTIZED_KINDS = {"fp8": eco.FP8(), "int4": eco.INT4()}


def _info_id(info):
    return f"{info.optim_cls.__module__.split('.')[0]}.{info.name}"


def _cases(*, quantized: bool):
    """(info, kind) pairs: every info with plain weights; eco's also with quantized ones where ``quantized``."""
    cases = [pytest.param(info, "plain", id=f"{_info_id(info)}-plain") for info in ALL_INFOS]
    if quantized:
        cases += [pytest.param(info, kind, id=f"{_info_id(info)}-{kind}")
                  for info in eco_optim_db for kind in QUANTIZED_KINDS]
    return cases


infos = pytest.mark.parametrize("info", [pytest.param(i, id=_info_id(i)) for i in ALL_INFOS])
infos_and_kinds = pytest.mark.parametrize("info, kind", _cases(quantized=True))


def _is_eco(info) -> bool:
    return issubclass(info.optim_cls, eco.optim._ECOOptimizer)


def all_inputs(info, skip=()):
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, info, skip=skip)


def weight_parameter(shape, kind, dtype=torch.float32, contiguous=True):
    """A weight as upstream builds it (randn), quantized when ``kind`` says so."""
    if contiguous:
        values = torch.randn(shape, device=DEVICE, dtype=dtype)
    else:
        values = torch.randn((*shape, 2), device=DEVICE, dtype=dtype)[..., 0]
    if kind == "plain":
        return Parameter(values)
    return Parameter(eco.QuantizedTensor.from_float(values, QUANTIZED_KINDS[kind]))


def for_kind(kwargs: dict, kind: str, *, moving: bool = False) -> dict:
    """Adapt a config to quantized weights: a fixed seed; with ``moving``, an lr that crosses the grid."""
    if kind == "plain":
        return kwargs
    kwargs = {"seed": 0, **kwargs}
    if moving and float(kwargs.get("lr", 1e-3)) < 0.05:
        kwargs["lr"] = 0.05
    return kwargs


def values(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, eco.QuantizedTensor) else t.detach()


def assert_same(actual, expected, path="", **tolerance):
    """Upstream's ``assertEqual`` for what these checks compare: nested state_dicts, tensors, numbers."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}", **tolerance)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]", **tolerance)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(values(actual), values(expected), msg=lambda m: f"{path}: {m}", **tolerance)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def step_and_schedule(optimizer, schedulers, closure, *, step_with_closure):
    if step_with_closure:
        loss = optimizer.step(closure)
    else:
        loss = closure()
        optimizer.step()
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()
    return loss


def assert_direction(kwargs, final, initial):
    if kwargs.get("maximize", False):
        assert final > initial
    else:
        assert final < initial


# ---------------------------------------------------------------- checks that do not apply
ECO_NO_IMPL = "eco optimizers have no foreach/fused/capturable implementation (OptimizerInfo.supported_impls=())"
NOT_APPLICABLE = {
    "test_foreach_matches_forloop": ECO_NO_IMPL,
    "test_set_default_dtype_works_with_foreach": ECO_NO_IMPL,
    "test_foreach_large_tensor": ECO_NO_IMPL,
    "test_peak_memory_foreach": ECO_NO_IMPL,
    "test_defaults_changed_to_foreach": ECO_NO_IMPL,
    "test_mixed_device_dtype": ECO_NO_IMPL,
    "test_fused_matches_forloop": ECO_NO_IMPL,
    "test_fused_error_on_params_on_meta": ECO_NO_IMPL,
    "test_fused_large_tensor": ECO_NO_IMPL,
    "test_fused_does_not_step_if_foundinf": ECO_NO_IMPL,
    "test_fused_step_stays_on_cpu": ECO_NO_IMPL,
    "test_fused_capturable_step_on_device": ECO_NO_IMPL,
    "test_fused_found_inf_cpu_steps": ECO_NO_IMPL,
    "test_fused_cpu_matches_cuda": ECO_NO_IMPL,
    "test_cpu_load_state_dict": ECO_NO_IMPL,
    "test_rosenbrock_sparse": "eco optimizers refuse sparse gradients (supports_sparse=False; test_errors checks "
                              "the refusal)",
    "test_second_order_optims_return_consistent_types": "eco optimizers are first-order (step_requires_closure="
                                                        "False)",
    "test_forloop_goes_right_direction_multigpu": "upstream runs it with two CUDA devices only; CI has none",
    "test_state_dict_with_cuda_params": "upstream runs it on CUDA only; CI has no GPU (eco's CUDA path, the Triton "
                                        "kernels, is checked under the interpreter in tests/test_kernels.py)",
    "test_adamw_serialization": "about torch.optim.Adam/AdamW's decoupled_weight_decay flag; eco's load drops it "
                                "(tests/test_optimizer_api.py loads torch.optim state_dicts)",
    "test_step_iteration": "checks torch.optim.LBFGS's closure count; no optimizer parameter",
}


@pytest.mark.parametrize("name", sorted(NOT_APPLICABLE))
@pytest.mark.parametrize("info", [pytest.param(i, id=_info_id(i)) for i in eco_optim_db])
def test_not_applicable(info, name):
    pytest.skip(f"{name}: {NOT_APPLICABLE[name]}")


# ---------------------------------------------------------------- the checks
@infos
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        assert not any(flag in optim_input.kwargs for flag in ("foreach", "fused", "differentiable"))


@pytest.mark.parametrize("info", [pytest.param(i, id=_info_id(i)) for i in ALL_INFOS
                                  if i.optim_error_inputs_func is not None])
def test_errors(info):
    for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        expect = (pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises)(
            error_input.error_type, match=error_input.error_regex)
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect:
                info.optim_cls(params, **kwargs)
        else:
            optimizer = info.optim_cls(params, **kwargs)
            with expect:
                optimizer.step()


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("info, kind, contiguous", [  # a quantized weight's codes are its own, contiguous
    pytest.param(*case.values, contiguous, id=f"{case.id}-{'contiguous' if contiguous else 'strided'}")
    for case in _cases(quantized=True) for contiguous in (True, False) if contiguous or case.values[1] == "plain"])
def test_forloop_goes_right_direction(info, kind, contiguous, with_lrsched):
    for schedulers_constructor in (info.scheduler_inputs if with_lrsched else [None]):
        for optim_input in info.optim_inputs_func(device=DEVICE):  # fresh: a scheduler mutates a tensor lr
            kwargs = for_kind(optim_input.kwargs, kind, moving=True)
            if "foreach" in info.supported_impls:
                kwargs["foreach"] = False  # the for-loop implementation
            weight = weight_parameter((10, 5), kind, contiguous=contiguous)
            bias = weight_parameter((10,), "plain", contiguous=contiguous)
            start = values(weight).clone()
            inpt = torch.randn(5, device=DEVICE)
            optimizer = info.optim_cls([weight, bias], **kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]

            def closure(optimizer=optimizer, weight=weight, bias=bias, inpt=inpt):
                optimizer.zero_grad()
                loss = (weight.mv(inpt) + bias).pow(2).sum()
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                step_and_schedule(optimizer, schedulers, closure, step_with_closure=info.step_requires_closure)
            assert_direction(kwargs, closure().item(), initial)
            if kind != "plain":
                assert not torch.equal(values(weight), start), optim_input.desc


@infos_and_kinds
def test_param_group_with_lrscheduler_goes_right_direction(info, kind):
    for schedulers_c in info.scheduler_inputs:
        weight = weight_parameter((10, 5), kind)
        weight2 = weight_parameter((10, 5), "plain")
        inpt = torch.randn(5, device=DEVICE)
        optimizer = info.optim_cls([{"params": [weight]}, {"params": [weight2], "lr": 0.01}],
                                   **for_kind({}, kind, moving=True))
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]

        def closure(optimizer=optimizer, weight=weight, weight2=weight2, inpt=inpt):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + weight2.mv(inpt)).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            step_and_schedule(optimizer, schedulers, closure, step_with_closure=True)
        assert closure().item() < initial


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@infos_and_kinds
def test_tensor_lr(info, kind, num_dim):
    for optim_input in all_inputs(info, skip=("differentiable",)):
        weight = weight_parameter((10, 5), kind)
        weight_c = Parameter(weight.detach().clone())
        bias = weight_parameter((10,), "plain")
        bias_c = Parameter(bias.detach().clone())
        inpt = torch.randn(5, device=DEVICE)
        kwargs = for_kind(optim_input.kwargs, kind)
        kwargs.pop("lr", None)
        kwargs["lr"] = 1.0 if info.step_requires_closure else 1e-3
        optimizer_r = info.optim_cls([weight, bias], **kwargs)
        try:
            kwargs["lr"] = torch.tensor(kwargs["lr"]).reshape([1] * num_dim)
            optimizer = info.optim_cls([weight_c, bias_c], **kwargs)
        except ValueError as error:
            assert "lr as a Tensor is not supported" in str(error)
            continue

        def closure(optim, w, b, inpt=inpt):
            optim.zero_grad()
            loss = (w.mv(inpt) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            closure(optimizer_r, weight, bias)
            optimizer_r.step()
            closure(optimizer, weight_c, bias_c)
            optimizer.step()
            assert_same(weight_c, weight, "weight")
            assert_same(bias_c, bias, "bias")


@pytest.mark.parametrize("info", [pytest.param(i, id=_info_id(i)) for i in ALL_INFOS if i.supports_complex])
def test_complex(info):
    for optim_input in all_inputs(info, skip=("differentiable", "fused")):
        # the last parameter is real on purpose: real and complex mix
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, 5, dtype=torch.float32, requires_grad=True)]
        real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                       for p in complex_params]
        complex_optimizer = info.optim_cls(complex_params, **optim_input.kwargs)
        real_optimizer = info.optim_cls(real_params, **optim_input.kwargs)
        real_steps, complex_steps = [], []
        for _ in range(3):
            for param, real in zip(complex_params, real_params, strict=True):
                grad = torch.randn_like(real)
                real.grad = grad.clone()
                param.grad = torch.view_as_complex(grad) if param.is_complex() else grad
                real_steps.append(real.detach().clone())
                complex_steps.append((torch.view_as_real(param) if param.is_complex() else param).detach().clone())
            real_optimizer.step()
            complex_optimizer.step()
        assert_same([torch.view_as_real(p) if p.is_complex() else p for p in complex_params], real_params)
        assert_same(complex_steps, real_steps)


def rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _states_round_stochastically(kwargs: dict) -> bool:
    """Whether eco stores some optimizer state below fp32 (with stochastic rounding) under ``kwargs``."""
    formats = [kwargs.get(k) for k in ("momentum", "second_moment", "momentum_state")]
    return kwargs.get("state_dtype") == torch.bfloat16 or any(f not in (None, "fp32") for f in formats)


@pytest.mark.parametrize("info", [pytest.param(i, id=_info_id(i)) for i in ALL_INFOS if i.supports_complex])
def test_complex_2d(info):
    for optim_input in all_inputs(info, skip=("differentiable", "fused")):
        if _states_round_stochastically(optim_input.kwargs):
            # One complex parameter draws one rounding seed per step, its real and imaginary parts as two
            # parameters draw two: stochastically rounded states differ by design (test_complex compares
            # against the real view, which draws alike).
            continue
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.detach().clone().requires_grad_()
        a1_imag = a1.imag.detach().clone().requires_grad_()
        optim1 = info.optim_cls([a1], **optim_input.kwargs)
        optim2 = info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
        for _ in range(3):
            optim1.zero_grad()
            optim2.zero_grad()
            rosenbrock(a1).abs().backward()
            rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
            assert_same(a1_real.grad, a1.grad.real)
            assert_same(a1_imag.grad, a1.grad.imag)
            optim1.step()
            optim2.step()
            assert_same(a1_real, a1.real)
            assert_same(a1_imag, a1.imag)
            with torch.no_grad():  # as upstream's TensorTracker: compare each step from the same point
                a1_real.copy_(a1.real)
                a1_imag.copy_(a1.imag)


@infos_and_kinds
def test_param_groups_weight_decay(info, kind):
    for optim_input in all_inputs(info, skip=("differentiable",)):
        weight_kwargs = for_kind(optim_input.kwargs, kind, moving=True)
        weight2_kwargs = {**weight_kwargs, "weight_decay": 0.0}
        weight_kwargs.pop("seed", None)
        weight2_kwargs.pop("seed", None)
        weight = weight_parameter((10, 5), kind)
        weight2 = weight_parameter((10, 5), "plain")
        inpt = torch.randn(5, device=DEVICE)
        optimizer = info.optim_cls([dict(params=[weight], **weight_kwargs), dict(params=[weight2], **weight2_kwargs)],
                                   **({"seed": 0} if kind != "plain" else {}))
        initial = (weight.mv(inpt) + weight2.mv(inpt)).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + weight2.mv(inpt)).pow(2).sum()
            loss.backward()
            optimizer.step()
        assert_direction(optim_input.kwargs, loss.item(), initial)


@infos_and_kinds
def test_param_groups_lr(info, kind):
    for optim_input in all_inputs(info, skip=("differentiable",)):
        kwargs = for_kind(optim_input.kwargs, kind, moving=True)
        seed = kwargs.pop("seed", None)
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        weight = weight_parameter((10, 5), kind)
        bias = weight_parameter((10,), "plain")
        irrelevant = weight_parameter((2, 2), "plain")
        irrelevant_clone = irrelevant.detach().clone()
        inpt = torch.randn(5, device=DEVICE)
        optimizer = info.optim_cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28,
                                   **({"seed": seed} if seed is not None else {}))
        initial = (weight.mv(inpt) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert_direction(optim_input.kwargs, loss.item(), initial)
        assert_same(irrelevant, irrelevant_clone)  # lr 1e-28: nothing moves


@infos
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3, requires_grad=False, device=DEVICE) for _ in range(2)]
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))


@infos_and_kinds
def test_step_is_noop_for_zero_grads(info, kind):
    for optim_input in all_inputs(info):
        kwargs = for_kind(optim_input.kwargs, kind)
        if kwargs.get("weight_decay", 0) != 0:
            continue  # weight decay moves parameters without gradients
        if info.optim_cls.__name__ == "AdamW":  # AdamW's default weight decay moves them too: a small lr
            kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr", 1e-5), torch.Tensor) else 1e-5
        param = weight_parameter((5, 1), kind)
        old_param = values(param).clone()
        params = [param.detach()] if kwargs.get("differentiable", False) else [param]
        optimizer = info.optim_cls(params, **kwargs)
        params[0].grad = torch.zeros(params[0].shape)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert_same(params[0], old_param, optim_input.desc)


@infos_and_kinds
def test_grads_are_never_inplaced_into(info, kind):
    for optim_input in all_inputs(info):
        kwargs = for_kind(optim_input.kwargs, kind)
        param = weight_parameter((5, 1), kind)
        params = [param.detach()] if kwargs.get("differentiable", False) else [param]
        optimizer = info.optim_cls(params, **kwargs)
        params[0].grad = torch.rand(params[0].shape)
        old_version = params[0].grad._version
        for _ in range(5):
            optimizer.step(lambda: torch.tensor([1.0]))
            assert params[0].grad._version == old_version


@infos
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3, device=DEVICE)) for _ in range(2)]
    for optim_input in all_inputs(info):
        repr(info.optim_cls(params, **optim_input.kwargs))


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    state_dict = deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@infos_and_kinds
def test_state_dict_deterministic(info, kind, is_named_optim0, is_named_optim1):
    weight = weight_parameter((2, 3), kind)
    bias = weight_parameter((2,), "plain")
    inpt = torch.randn(3, device=DEVICE)

    def fwd_bwd(optim, w, b):
        optim.zero_grad()
        loss = (w.mv(inpt) + b).pow(2).sum()
        loss.backward()
        return loss

    for optim_input in all_inputs(info, skip=("differentiable",)):
        kwargs = for_kind(optim_input.kwargs, kind)
        optimizer = info.optim_cls(_named([weight, bias], is_named_optim0), **kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias)
        for _ in range(10):  # prime the optimizer
            closure()
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = info.optim_cls(_named([weight_c, bias_c], is_named_optim1), **kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c)
        optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
        for _ in range(10):  # both in step
            closure()
            closure_c()
            optimizer.step()
            optimizer_c.step()
            assert_same(weight_c, weight, "weight")
            assert_same(bias_c, bias, "bias")
        # the state_dict is deterministic for equal (not identical) parameters; names are optional
        assert_same(_without_param_names(optimizer_c.state_dict()), _without_param_names(optimizer.state_dict()))
        # repeated parameters have identical representation (pytorch#36831)
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_same(_without_param_names(optimizer_c.state_dict())["param_groups"][-1],
                    _without_param_names(optimizer.state_dict())["param_groups"][-1])


def model_and_input(kind):
    """Upstream's Conv2d + BatchNorm2d model; a quantized kind gets a Linear + LayerNorm model with a quantized
    Linear weight instead (eco.quantize_ takes Linear weights, not convolutions)."""
    if kind == "plain":
        return (nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)),
                torch.rand(1, 4, 16, 16, device=DEVICE))
    model = eco.quantize_(nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8)), QUANTIZED_KINDS[kind])
    return model, torch.rand(3, 16, device=DEVICE)


def _fwd_bwd(optim, mod, inpt):
    optim.zero_grad()
    loss = mod(inpt).sum()
    loss.backward()
    return loss


@infos_and_kinds
def test_can_load_older_state_dict(info, kind):
    for optim_input in all_inputs(info, skip=("differentiable",)):
        torch.manual_seed(1)
        model, inpt = model_and_input(kind)
        optimizer = info.optim_cls(model.parameters(), **for_kind(optim_input.kwargs, kind))
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        old_state_dict = deepcopy(optimizer.state_dict())  # as saved before these flags existed
        for group in old_state_dict["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        _fwd_bwd(optimizer, model, inpt)
        optimizer.step()  # and it still steps


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@infos_and_kinds
def test_can_load_from_to_named_state_dict(info, kind, is_named_optim0, is_named_optim1):
    for optim_input in all_inputs(info, skip=("differentiable",)):
        torch.manual_seed(1)
        model, inpt = model_and_input(kind)
        kwargs = for_kind(optim_input.kwargs, kind)
        optimizer = info.optim_cls(model.named_parameters() if is_named_optim0 else model.parameters(), **kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        old_state_dict = deepcopy(optimizer.state_dict())
        optimizer2 = info.optim_cls(model.named_parameters() if is_named_optim1 else model.parameters(), **kwargs)
        optimizer2.load_state_dict(old_state_dict)
        _fwd_bwd(optimizer2, model, inpt)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:  # names given to either optimizer are kept
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in
                                                                                  model.named_parameters()]


@pytest.mark.parametrize("is_named_optim", [True, False])
@infos_and_kinds
def test_save_load_equality_with_weights_only(info, kind, is_named_optim):
    weight = weight_parameter((2, 3), kind)
    bias = weight_parameter((2,), "plain")
    inpt = torch.randn(3, device=DEVICE)
    for optim_input in all_inputs(info, skip=("differentiable",)):
        optimizer = info.optim_cls(_named([weight, bias], is_named_optim), **for_kind(optim_input.kwargs, kind))

        def closure(optimizer=optimizer):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        for weights_only in (False, True):
            buf.seek(0)
            assert_same(torch.load(buf, weights_only=weights_only), sd)


@infos_and_kinds
def test_load_nontensor_step(info, kind):
    params = [weight_parameter((2, 3), kind) for _ in range(2)]
    for p in params:
        p.grad = torch.rand(p.shape)
    for optim_input in all_inputs(info, skip=("differentiable",)):
        optimizer = info.optim_cls(params, **for_kind(optim_input.kwargs, kind))
        for _ in range(3):
            optimizer.step()
        state_dict = deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict) -> dict:
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _load_state_dict_pre_hook1(optimizer: Optimizer, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Optimizer, state_dict: dict) -> dict:
    my_state_dict = deepcopy(state_dict)  # a hook that returns a new state_dict: that one is loaded
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer: Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _one_param_optimizers(info):
    for optim_input in all_inputs(info):
        param = torch.rand(2, 3, device=DEVICE, requires_grad=True)
        yield info.optim_cls([param], **optim_input.kwargs)


@infos
def test_state_dict_pre_hook(info):
    for optim in _one_param_optimizers(info):
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1


@infos
def test_state_dict_post_hook(info):
    for optim in _one_param_optimizers(info):
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert optim.state_dict()["ran_state_dict_pre_hook"] is False


@infos
def test_state_dict_pre_post_hook(info):
    for optim in _one_param_optimizers(info):
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True


@infos
def test_load_state_dict_pre_hook_and_prepend(info):
    for optim in _one_param_optimizers(info):
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002  # prepended: hook1 runs last and wins


@infos
def test_load_state_dict_post_hook(info):
    for optim in _one_param_optimizers(info):
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]


@infos
def test_load_state_dict_pre_post_hook(info):
    for optim in _one_param_optimizers(info):
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]


@infos
def test_step_post_hook(info):
    params = [torch.tensor([[1.0, 1.0]], device=DEVICE)]
    for optim_input in all_inputs(info):
        optim = info.optim_cls(params, **optim_input.kwargs)
        calls = []
        handle = optim.register_step_post_hook(lambda *_, calls=calls: calls.append("post"))
        optim.step()
        optim.step()
        assert calls == ["post", "post"]
        handle.remove()
        optim.step()
        assert calls == ["post", "post"]


@infos
def test_step_pre_hook(info):
    params = [torch.tensor([[1.0, 1.0]], device=DEVICE)]
    for optim_input in all_inputs(info):
        optim = info.optim_cls(params, **optim_input.kwargs)
        calls = []
        handle = optim.register_step_pre_hook(lambda *_, calls=calls: calls.append("pre"))
        optim.step()
        optim.step()
        assert calls == ["pre", "pre"]
        handle.remove()
        optim.step()
        assert calls == ["pre", "pre"]


@infos
def test_step_all_hooks(info):
    params = [torch.tensor([[1.0, 1.0]], device=DEVICE)]
    for optim_input in all_inputs(info):
        optim = info.optim_cls(params, **optim_input.kwargs)
        optim2 = SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda *_, data=data: data.append(0)),
            register_optimizer_step_post_hook(lambda *_, data=data: data.append(5)),
            optim.register_step_pre_hook(lambda *_, data=data: data.append(1)),
            optim.register_step_post_hook(lambda *_, data=data: data.append(2)),
            optim2.register_step_pre_hook(lambda *_, data=data: data.append(1)),
            optim2.register_step_post_hook(lambda *_, data=data: data.append(2)),
        ]
        try:
            optim.step()
            optim2.step()
            optim.step()
            assert data == [0, 1, 2, 5] * 3  # global pre, local pre, local post, global post
        finally:
            for handle in handles:
                handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


@infos_and_kinds
def test_deepcopy_copies_all_public_attrs(info, kind):
    params = [weight_parameter((2, 3), kind) for _ in range(2)]
    for p in params:
        p.grad = torch.rand(p.shape)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in all_inputs(info, skip=("differentiable",)):
        optimizer = info.optim_cls(params, **for_kind(optim_input.kwargs, kind))
        for _ in range(3):
            optimizer.step()
        assert public(deepcopy(optimizer)) == public(optimizer)


@infos_and_kinds
def test_non_empty_state(info, kind):
    model = nn.Linear(5, 5, bias=False)
    if kind != "plain":
        eco.quantize_(model, QUANTIZED_KINDS[kind])
    inpt = torch.rand(2, 5, device=DEVICE)
    for optim_input in info.optim_inputs_func(device=DEVICE):
        optim = info.optim_cls(model.parameters(), **for_kind(optim_input.kwargs, kind))
        optim.zero_grad()
        model(inpt).sum().backward()
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0
