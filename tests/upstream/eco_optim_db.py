"""``OptimizerInfo`` entries for ``eco.AdamW`` and ``eco.SGD``: the optimizer database the generic checks run on.

An entry tells torch's generic optimizer checks (test_torch_optim_generic.py)
how to build the optimizer (``optim_inputs_func``: one config per row below),
which constructions and steps must fail and how
(``optim_error_inputs_func``), and what it supports: no fused, foreach or
differentiable implementation, no sparse gradients, complex parameters yes.
Options that only matter for quantized weights (``master_weights``,
``error_feedback``, ...) are in the configs too: the checks rerun on FP8 and
INT4 weights where a check builds its own weights.
"""

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import eco

#: options every eco group carries that a torch.optim state_dict (or an older eco one) may lack
ECO_GROUP_OPTIONS = ("rounding", "error_feedback", "master_weights")


def _inputs(rows):
    return [OptimizerInput(params=None, kwargs=kwargs, desc=desc) for desc, kwargs in rows]


def optim_inputs_func_eco_adamw(device, dtype=None):
    return _inputs([
        ("default", {}),
        ("non-default lr", {"lr": 0.01}),
        ("tensor lr", {"lr": torch.tensor(0.001)}),
        ("no weight decay", {"weight_decay": 0.0}),
        ("large weight decay", {"weight_decay": 0.3}),
        ("betas, eps", {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("nearest rounding", {"rounding": "nearest"}),
        # bf16 states round stochastically (a seed makes two optimizers draw alike)
        ("bf16 states", {"state_dtype": torch.bfloat16, "seed": 0}),
        ("bf16 states, nearest, weight decay", {"state_dtype": torch.bfloat16, "rounding": "nearest",
                                                "weight_decay": 0.1, "seed": 0}),
        ("decay-corrected injection", {"decay_corrected_injection": True, "weight_decay": 0.1}),
        ("master weights", {"master_weights": True}),
        ("no error feedback", {"error_feedback": False}),
        ("nonfinite raise", {"nonfinite": "raise"}),
    ])


def optim_inputs_func_eco_sgd(device, dtype=None):
    return _inputs([
        ("default", {}),
        ("non-default lr", {"lr": 0.05}),
        ("tensor lr", {"lr": torch.tensor(0.001)}),
        ("weight decay", {"weight_decay": 0.1}),
        ("momentum 0.5", {"momentum": 0.5}),
        ("nearest rounding", {"rounding": "nearest"}),
        # bf16 states round stochastically (a seed makes two optimizers draw alike)
        ("bf16 states", {"state_dtype": torch.bfloat16, "seed": 0}),
        ("bf16 states, nearest, weight decay", {"state_dtype": torch.bfloat16, "rounding": "nearest",
                                                "weight_decay": 0.1, "seed": 0}),
        ("master weights", {"master_weights": True}),
        ("no momentum, no error feedback", {"momentum": 0.0, "error_feedback": False}),
        ("nonfinite raise", {"nonfinite": "raise"}),
    ])


def _error(kwargs, error_type, regex, desc, params=None, on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
    return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_on=on,
                               error_type=error_type, error_regex=regex)


def _shared_error_inputs(device, dtype):
    """torch's errors for every optimizer, then eco's own: bad options, parameters and steps eco refuses."""
    sparse = nn.Parameter(torch.randn(4, 2, device=device, dtype=dtype))
    sparse.grad = torch.randn(4, 2, device=device, dtype=dtype).to_sparse()
    nan_grad = nn.Parameter(torch.randn(4, 2, device=device, dtype=dtype))
    nan_grad.grad = torch.full_like(nan_grad, float("nan"))
    layer = nn.Linear(4, 4)
    replaced = layer.weight
    eco.quantize_(layer, eco.FP8())
    return get_error_inputs_for_all_optims(device, dtype) + [
        _error({"lr": -1.0}, ValueError, "lr must be >= 0", "negative lr"),
        _error({"lr": float("nan")}, ValueError, "lr must be >= 0", "NaN lr"),
        _error({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0", "negative weight decay"),
        _error({"weight_decay": float("nan")}, ValueError, "weight_decay must be >= 0", "NaN weight decay"),
        _error({"rounding": "up"}, ValueError, "rounding must be one of", "unknown rounding"),
        _error({"state_dtype": torch.float16}, ValueError, "state_dtype must be one of", "fp16 states"),
        _error({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of", "unknown nonfinite policy"),
        _error({"backend": "gpu"}, ValueError, "backend must be one of", "unknown backend"),
        _error({}, TypeError, "updates floating-point parameters", "integer parameter",
               params=[torch.zeros(3, dtype=torch.int64)]),
        _error({}, RuntimeError, "Build the optimizer after eco.quantize_", "parameter replaced by quantize_",
               params=[replaced]),
        _error({}, RuntimeError, "does not support sparse gradients", "sparse gradient", params=[sparse],
               on=OptimizerErrorEnum.STEP_ERROR),
        _error({"nonfinite": "raise"}, FloatingPointError, "a step with non-finite gradients", "NaN gradient",
               params=[nan_grad], on=OptimizerErrorEnum.STEP_ERROR),
        _error({"nonfinite": "skip"}, RuntimeWarning, "skipped a step with non-finite gradients",
               "NaN gradient, skipped", params=[nan_grad], on=OptimizerErrorEnum.STEP_ERROR),
    ]


def optim_error_inputs_func_eco_adamw(device, dtype):
    return _shared_error_inputs(device, dtype) + [
        _error({"eps": float("nan")}, ValueError, "eps must be > 0", "NaN eps"),
        _error({"eps": 0.0}, ValueError, "eps must be > 0", "zero eps"),
        _error({"betas": (1.0, 0.999)}, ValueError, "betas must satisfy", "beta1 of 1"),
        _error({"betas": (0.9, float("nan"))}, ValueError, "betas must satisfy", "NaN beta2"),
        _error({"betas": (torch.tensor([0.9, 0.9]), 0.999)}, ValueError, "Tensor betas must be 1-element",
               "2-element tensor beta"),
    ]


def optim_error_inputs_func_eco_sgd(device, dtype):
    return _shared_error_inputs(device, dtype) + [
        _error({"momentum": -0.5}, ValueError, "momentum must satisfy", "negative momentum"),
        _error({"momentum": 1.0}, ValueError, "momentum must satisfy", "momentum of 1"),
        _error({"momentum": 0.0}, ValueError, "needs momentum > 0", "ECO without momentum"),
    ]


# torch's SGD entry runs these scheduler combinations; eco.SGD and eco.AdamW run them all
SCHEDULER_INPUTS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.99, step_size=10), lambda opt: ExponentialLR(opt, gamma=0.99),
     lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
)

eco_optim_db = [
    OptimizerInfo(
        eco.AdamW,
        optim_inputs_func=optim_inputs_func_eco_adamw,
        optim_error_inputs_func=optim_error_inputs_func_eco_adamw,
        scheduler_inputs=SCHEDULER_INPUTS,
        supported_impls=(),
        not_og_supported_flags=(*ECO_GROUP_OPTIONS, "decay_corrected_injection"),
        supports_complex=True,
    ),
    OptimizerInfo(
        eco.SGD,
        optim_inputs_func=optim_inputs_func_eco_sgd,
        optim_error_inputs_func=optim_error_inputs_func_eco_sgd,
        scheduler_inputs=SCHEDULER_INPUTS,
        supported_impls=(),
        not_og_supported_flags=ECO_GROUP_OPTIONS,
        supports_complex=True,
    ),
]
