"""The backend functions of the kernels: ``eco.reference``'s signatures, run as Triton launches.

Quantized weights: one launch per weight and pass, or, for many small ones of
the same dtypes, one multi-tensor launch per group and pass (bit for bit the
results of one launch per weight with its seed). Row-wise FP8 and tensor-wise
INT4 take two passes (the absmax of the whole row/matrix first). Not run as
kernels (they go to ``eco.reference`` on the same device):
``update_weight=False`` (moments only, a rare step).
"""

from __future__ import annotations

import torch

from eco import reference
from eco.formats import QuantFormat, check_rounding

from . import launcher
from .launcher import check_has_kernel, contiguous, dummy, geometry, scalar_args, specs, triton


def _run_step(kind, *, codes, scales, grad, exp_avg, exp_avg_sq, master, src, fmt, shape, scalars, inject,
              rounding, seed, state_dtype, grad_dtype, optimizer):
    """One weight: one launch (two for row/tensor scales). ``master`` is the fp32 master copy or None."""
    check_rounding(rounding)
    fmt.check_shape(shape)
    check_has_kernel(fmt)
    geo = geometry(fmt, shape)
    two_pass = fmt.group_size is None
    device = codes.device
    has_master = master is not None
    workspace = (torch.zeros(2 * scales.numel(), dtype=torch.int32, device=device) if two_pass
                 else dummy(torch.int32, device))
    args = dict(
        codes_ptr=codes.view(torch.uint8), scales_ptr=scales, workspace_ptr=workspace, grad_ptr=grad,
        exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq, master_ptr=master if has_master else dummy(torch.float32,
                                                                                                       device),
        src_ptr=src, n_cols=geo["n_cols"], code_cols=geo["code_cols"], rows_per_scale=geo["rows_per_scale"],
        n_scale_groups=scales.numel(), seed=int(seed or 0), inject=float(inject), **scalar_args(scalars),
    )
    for pass_ in ((0, 1) if two_pass else (1,)):
        spec = specs.find_spec(kind, optimizer=optimizer, format=fmt.config(), rounding=rounding,
                               state_dtype=state_dtype, grad_dtype=grad_dtype, master=has_master, pass_=pass_)
        if spec is None:
            raise ValueError(f"no {kind} kernel for {optimizer} {fmt} with state {state_dtype} and gradient/input "
                             f"{grad_dtype}; supported: {specs.STATE_DTYPES} states, {specs.GRAD_DTYPES} gradients")
        launcher.launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], spec.constexprs["BLOCK"])), **args)


def _check_quantized(codes, scales, fmt, shape):
    if tuple(codes.shape) != tuple(fmt.code_shape(shape)) or tuple(scales.shape) != tuple(fmt.scale_shape(shape)):
        raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not match {fmt} for shape "
                         f"{tuple(shape)}")
    contiguous("codes", codes, written=True)
    contiguous("scales", scales, written=True)


# ---------------------------------------------------------------- quantized weights
@torch.no_grad()
def adamw_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor, master: torch.Tensor | None, *, fmt: QuantFormat, shape: torch.Size,
    scalars: reference.AdamWScalars, rounding: str, seed: int | None, update_weight: bool = True,
) -> None:
    """:func:`eco.reference.adamw_step_` as one fused kernel (two launches for row/tensor scales)."""
    if not update_weight:
        return reference.adamw_step_(codes, scales, grad, exp_avg, exp_avg_sq, master, fmt=fmt, shape=shape,
                                     scalars=scalars, rounding=rounding, seed=seed, update_weight=False)
    _check_quantized(codes, scales, fmt, shape)
    grad = contiguous("grad", grad, written=False)
    _run_step("step", codes=codes, scales=scales, grad=grad, exp_avg=contiguous("exp_avg", exp_avg, written=True),
              exp_avg_sq=contiguous("exp_avg_sq", exp_avg_sq, written=True), master=master, src=grad, fmt=fmt,
              shape=shape, scalars=scalars, inject=0.0 if master is not None else scalars.inject, rounding=rounding,
              seed=seed, state_dtype=exp_avg.dtype, grad_dtype=grad.dtype, optimizer="adamw")


@torch.no_grad()
def sgd_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor,
    master: torch.Tensor | None, *, fmt: QuantFormat, shape: torch.Size, scalars: reference.SGDScalars,
    rounding: str, seed: int | None, update_weight: bool = True,
) -> None:
    """:func:`eco.reference.sgd_step_` as one fused kernel (two launches for row/tensor scales)."""
    if not update_weight:
        return reference.sgd_step_(codes, scales, grad, momentum_buf, master, fmt=fmt, shape=shape, scalars=scalars,
                                   rounding=rounding, seed=seed, update_weight=False)
    _check_quantized(codes, scales, fmt, shape)
    grad = contiguous("grad", grad, written=False)
    momentum_buf = contiguous("momentum_buf", momentum_buf, written=True)
    _run_step("step", codes=codes, scales=scales, grad=grad, exp_avg=momentum_buf, exp_avg_sq=momentum_buf,
              master=master, src=grad, fmt=fmt, shape=shape, scalars=scalars,
              inject=0.0 if master is not None else scalars.inject, rounding=rounding, seed=seed,
              state_dtype=momentum_buf.dtype, grad_dtype=grad.dtype, optimizer="sgd")


def _step_many(optimizer, single, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt, shapes, scalars,
               rounding, seeds) -> None:
    """Small qualifying weights of the same dtypes: one launch per group and pass; ``single(i)`` steps the rest."""
    check_rounding(rounding)
    check_has_kernel(fmt)
    groups: dict = {}
    for i, (c, s, g, m, v, w, shape) in enumerate(zip(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, shapes,
                                                      strict=True)):
        fmt.check_shape(shape)
        if launcher.groupable(fmt, shape, c, s, g, m, v, w) and (w is None or w.dtype == torch.float32):
            groups.setdefault((g.dtype, m.dtype, w is not None, c.device), []).append(i)
        else:
            single(i)
    for (grad_dtype, state_dtype, has_master, device), members in groups.items():
        if len(members) == 1:
            single(members[0])
            continue
        found = [specs.find_spec("step_multi", optimizer=optimizer, format=fmt.config(), rounding=rounding,
                                 state_dtype=state_dtype, grad_dtype=grad_dtype, master=has_master, pass_=pass_)
                 for pass_ in ((1,) if fmt.group_size else (0, 1))]
        if None in found:
            raise ValueError(f"no {optimizer} kernel for {fmt} with state {state_dtype} and gradient {grad_dtype}; "
                             f"supported: {specs.STATE_DTYPES} states, {specs.GRAD_DTYPES} gradients")
        master_dummy = dummy(torch.float32, device)
        items = [(shapes[i], codes[i].view(torch.uint8), scales[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                  masters[i] if has_master else master_dummy) for i in members]
        table, seed_slots, workspace_size, n_programs = launcher.step_table(fmt, found[0].constexprs["BLOCK"], items)
        _, codes0, scales0, grad0, exp_avg0, exp_avg_sq0, master0 = items[0]
        args = dict(
            codes_ptr=codes0, scales_ptr=scales0, grad_ptr=grad0, exp_avg_ptr=exp_avg0, exp_avg_sq_ptr=exp_avg_sq0,
            master_ptr=master0,
            table_ptr=launcher.device_table(table, seed_slots, [int(seeds[i] or 0) for i in members], device),
            workspace_ptr=(torch.zeros(workspace_size, dtype=torch.int32, device=device) if workspace_size
                           else dummy(torch.int32, device)),
            inject=0.0 if has_master else float(scalars.inject), **scalar_args(scalars),
        )
        for spec in found:  # row/tensor scales: the absmax pass of every tensor, then the storing pass
            launcher.launch(spec, (n_programs,), **args)


@torch.no_grad()
def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt: QuantFormat, shapes,
                 scalars: reference.AdamWScalars, rounding: str, seeds, update_weight: bool = True) -> None:
    """:func:`adamw_step_` for many weights of one format with the same scalars (lists; ``masters`` may hold None).

    Small weights (at most ``launcher.MULTI_TENSOR_MAX_NUMEL`` elements, last
    dimension a multiple of 16, contiguous 16-byte aligned tensors) with the
    same dtypes share one launch (two for row/tensor scales); the others get
    their own. Bit for bit the results of one :func:`adamw_step_` per weight.
    """
    def single(i):
        adamw_step_(codes[i], scales[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], fmt=fmt, shape=shapes[i],
                    scalars=scalars, rounding=rounding, seed=seeds[i], update_weight=update_weight)

    if not update_weight:  # moments only, on the reference (as adamw_step_)
        for i in range(len(codes)):
            single(i)
        return
    _step_many("adamw", single, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, fmt=fmt, shapes=shapes,
               scalars=scalars, rounding=rounding, seeds=seeds)


@torch.no_grad()
def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt: QuantFormat, shapes,
               scalars: reference.SGDScalars, rounding: str, seeds, update_weight: bool = True) -> None:
    """:func:`sgd_step_` for many weights of one format with the same scalars, grouped as :func:`adamw_steps_`."""
    def single(i):
        sgd_step_(codes[i], scales[i], grads[i], momentum_bufs[i], masters[i], fmt=fmt, shape=shapes[i],
                  scalars=scalars, rounding=rounding, seed=seeds[i], update_weight=update_weight)

    if not update_weight:
        for i in range(len(codes)):
            single(i)
        return
    _step_many("sgd", single, codes, scales, grads, momentum_bufs, momentum_bufs, masters, fmt=fmt, shapes=shapes,
               scalars=scalars, rounding=rounding, seeds=seeds)


# ---------------------------------------------------------------- the codec
def codec_covers(fmt: QuantFormat, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether :func:`quantize`/:func:`dequantize` run these CUDA tensors (input/output ``dtype``)."""
    return (launcher.has_kernel(fmt) and dtype in specs.GRAD_DTYPES and all(t.is_cuda for t in tensors)
            and launcher.aligned(*tensors))


@torch.no_grad()
def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`QuantFormat.quantize` as a kernel; returns ``(codes, scales)`` (``x`` must be finite)."""
    fmt.check_shape(x.shape)
    x = contiguous("x", x, written=False)
    code_dtype = torch.float8_e4m3fn if fmt.name == "fp8" else torch.uint8
    codes = torch.empty(fmt.code_shape(x.shape), dtype=code_dtype, device=x.device)
    scales = torch.empty(fmt.scale_shape(x.shape), dtype=torch.float32, device=x.device)
    f32 = dummy(torch.float32, x.device)
    _run_step("quantize", codes=codes, scales=scales, grad=f32, exp_avg=f32, exp_avg_sq=f32, master=None, src=x,
              fmt=fmt, shape=x.shape, scalars=None, inject=0.0, rounding=rounding, seed=seed, state_dtype=None,
              grad_dtype=x.dtype, optimizer=None)
    return codes, scales


@torch.no_grad()
def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:meth:`QuantFormat.dequantize` as a kernel."""
    _check_quantized(codes, scales, fmt, shape)
    spec = specs.find_spec("dequantize", format=fmt.config(), out_dtype=dtype) if launcher.has_kernel(fmt) else None
    if spec is None:
        raise ValueError(f"no dequantize kernel for {fmt} to {dtype}; use fmt.dequantize")
    out = torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    geo = geometry(fmt, shape)
    launcher.launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], spec.constexprs["BLOCK"])),
                    codes_ptr=codes.view(torch.uint8), scales_ptr=scales, out_ptr=out, n_cols=geo["n_cols"],
                    code_cols=geo["code_cols"], rows_per_scale=geo["rows_per_scale"])
    return out


# ---------------------------------------------------------------- plain parameters
def _plain_spec(kernel: str, optimizer: str, param: torch.Tensor, state: torch.Tensor):
    spec = specs.find_spec(kernel, optimizer=optimizer, state_dtype=state.dtype, grad_dtype=param.dtype)
    if spec is None:
        raise ValueError(f"no plain {optimizer} kernel for a {param.dtype} parameter with {state.dtype} state; "
                         f"supported: {specs.GRAD_DTYPES} parameters, {specs.STATE_DTYPES} states")
    return spec


def _plain_single(optimizer, param, grad, exp_avg, exp_avg_sq, scalars):
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    spec = _plain_spec("plain", optimizer, param, exp_avg)
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        contiguous(name, t, written=True)
    launcher.launch(spec, (triton.cdiv(param.numel(), spec.constexprs["BLOCK"]),), param_ptr=param,
                    grad_ptr=contiguous("grad", grad, written=False), exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq,
                    numel=param.numel(), **scalar_args(scalars))


def _plain_many(optimizer, params, grads, exp_avgs, exp_avg_sqs, scalars):
    """Small same-dtype tensors share one launch per group; big ones get their own.

    Only tensors whose numel is a multiple of 16 are grouped: the multi-tensor
    kernel is compiled for 128-bit accesses, which a ragged end would break.
    """
    groups: dict = {}
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if (p.numel() > launcher.MULTI_TENSOR_MAX_NUMEL or p.numel() % 16 or g.dtype != p.dtype
                or not launcher.aligned(p, g, m, v)):
            _plain_single(optimizer, p, g, m, v, scalars)
            continue
        groups.setdefault((p.dtype, m.dtype, p.device), []).append((p, g, m, v))
    for items in groups.values():
        if len(items) == 1:
            _plain_single(optimizer, *items[0], scalars)
            continue
        ps, gs, ms, vs = (list(x) for x in zip(*items, strict=True))
        spec = _plain_spec("plain_multi", optimizer, ps[0], ms[0])
        block = spec.constexprs["BLOCK"]
        n_programs = sum(triton.cdiv(p.numel(), block) for p in ps)
        launcher.launch(spec, (n_programs,), param_ptr=ps[0], grad_ptr=gs[0], exp_avg_ptr=ms[0], exp_avg_sq_ptr=vs[0],
                        table_ptr=launcher.plain_table(ps, gs, ms, vs, block), **scalar_args(scalars))


@torch.no_grad()
def plain_adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      *, scalars: reference.AdamWScalars) -> None:
    """:func:`eco.reference.plain_adamw_step_` as a kernel."""
    _plain_single("adamw", param, grad, exp_avg, exp_avg_sq, scalars)


@torch.no_grad()
def plain_sgd_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *,
                    scalars: reference.SGDScalars) -> None:
    """:func:`eco.reference.plain_sgd_step_` as a kernel."""
    _plain_single("sgd", param, grad, momentum_buf, momentum_buf, scalars)


@torch.no_grad()
def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars: reference.AdamWScalars,
                       seeds=None) -> None:
    """:func:`plain_adamw_step_` for many tensors with the same scalars, small ones grouped into few launches.

    ``seeds`` (the stochastic rounding of bf16 states) are not used yet: bf16 states round to nearest here.
    """
    _plain_many("adamw", params, grads, exp_avgs, exp_avg_sqs, scalars)


@torch.no_grad()
def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars: reference.SGDScalars, seeds=None) -> None:
    """:func:`plain_sgd_step_` for many tensors with the same scalars, small ones grouped into few launches
    (``seeds``: as :func:`plain_adamw_steps_`)."""
    _plain_many("sgd", params, grads, momentum_bufs, momentum_bufs, scalars)
