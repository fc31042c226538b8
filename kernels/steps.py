"""The backend functions of the kernels: ``eco.reference``'s signatures, run as Triton launches.

Quantized weights: one launch per weight and pass, or, for many small ones of
the same format, state formats and dtypes, one multi-tensor launch per group
and pass (bit for bit the results of one launch per weight with its seed).
Row-wise FP8 and tensor-wise INT4 take two passes (the absmax of the whole
row/matrix first). A factored second moment adds two launches after the step
(``moments.factored_stats_kernel``, ``moments.factored_finalize_kernel``).

Every pair of state formats (``eco.states``) has kernels, with and without a
master copy (``specs.STEP_STATES``; plain parameters: ``specs.PLAIN_STATES``
and ``specs.PLAIN_TILE_STATES``). Not run as kernels (they go to
``eco.reference`` on the same device, tensor by tensor, with the same seeds):
``update_weight=False`` (moments only, a rare step) and a plain parameter
whose gradient has another dtype.

Workspace (temporary device memory of one step, besides the launch tables):
row-wise FP8 and tensor-wise INT4 keep two int32 words per row/matrix (the new
absmax and the old scale); a factored second moment keeps an int32 ``max |g|``
per matrix and the int64 sums of its fixed-point g*g: one per row, one per
column per matrix, one per matrix. Nothing of the tensor's size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from eco import reference, states
from eco.formats import QuantFormat, check_rounding

from . import launcher
from .launcher import check_has_kernel, contiguous, dummy, geometry, scalar_args, specs, triton


class _Job(NamedTuple):
    """One tensor's step: what ``eco.reference.step_`` takes."""

    weight: torch.Tensor  # the codes of a quantized weight, or the plain parameter
    scales: torch.Tensor | None
    grad: torch.Tensor
    m: reference.Moment
    v: reference.Moment | None
    master: torch.Tensor | None
    shape: torch.Size
    seed: int | None  # resolved (None: nothing is rounded stochastically)
    offset: int = 0
    reduce: reference.Reduce | None = None
    full_shape: tuple | None = None

    @property
    def states(self) -> tuple:
        return self.m.fmt.name, self.v.fmt.name if self.v is not None else None

    @property
    def factored(self) -> bool:
        return self.v is not None and isinstance(self.v.fmt, states.Factored)


def _job(weight, scales, grad, m, v, master, shape, seed, *, stochastic_weight: bool, offset=0, reduce=None,
         full_shape=None) -> _Job:
    """A job with its states as Moments and its seed resolved as ``reference.step_`` resolves it (drawn from
    torch's global generator when None and something rounds stochastically)."""
    m = reference.as_moment(m)
    v = reference.as_moment(v) if v is not None else None
    needs_seed = stochastic_weight or m.fmt.stochastic or (v is not None and v.fmt.stochastic)
    seed = reference._resolve_seed(seed) if needs_seed else None
    if len(shape) != 2:
        reduce = None  # as reference.step_: a dim-0 shard of stacked matrices (experts) holds whole matrices
    return _Job(weight, scales, grad.reshape(shape), m, v, master, torch.Size(shape), seed, offset, reduce,
                full_shape)


def _reference_step(optimizer: str, fmt: QuantFormat | None, job: _Job, scalars, rounding: str,
                    update_weight: bool = True) -> None:
    """The job on ``eco.reference`` (its seed already resolved: the same random numbers as a kernel)."""
    extra = dict(seed=job.seed, offset=job.offset, reduce=job.reduce, full_shape=job.full_shape)
    if fmt is None:
        if optimizer == "adamw":
            reference.plain_adamw_step_(job.weight, job.grad, job.m, job.v, scalars=scalars, **extra)
        else:
            reference.plain_sgd_step_(job.weight, job.grad, job.m, scalars=scalars, **extra)
    elif optimizer == "adamw":
        reference.adamw_step_(job.weight, job.scales, job.grad, job.m, job.v, job.master, fmt=fmt, shape=job.shape,
                              scalars=scalars, rounding=rounding, update_weight=update_weight, **extra)
    else:
        reference.sgd_step_(job.weight, job.scales, job.grad, job.m, job.master, fmt=fmt, shape=job.shape,
                            scalars=scalars, rounding=rounding, update_weight=update_weight, **extra)


def _step_specs(kernel: str, optimizer: str, fmt: QuantFormat | None, job: _Job, rounding: str) -> list | None:
    """The specs of a job's launches (one per pass), or None when a state format or dtype has no kernel."""
    passes = (0, 1) if fmt is not None and fmt.group_size is None else (1,)
    found = [specs.find_spec(kernel, optimizer=optimizer, format=fmt.config() if fmt is not None else None,
                             rounding=rounding, states=job.states, grad_dtype=job.grad.dtype,
                             master=job.master is not None, pass_=p) for p in passes]
    return None if None in found else found


def _state_pointers(job: _Job) -> dict:
    """The moment pointer arguments of a job (unused parts: fp32 dummies; E4M3 codes as uint8)."""
    device = job.grad.device
    f32 = dummy(torch.float32, device)

    def codes(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    args = dict(exp_avg_ptr=codes(job.m.tensors[0]),
                exp_avg_scale_ptr=job.m.tensors[1] if len(job.m.tensors) == 2 else f32,
                exp_avg_sq_ptr=f32, exp_avg_sq_scale_ptr=f32, v_row_ptr=f32, v_col_ptr=f32, v_mean_ptr=f32)
    if job.factored:
        args.update(zip(("v_row_ptr", "v_col_ptr", "v_mean_ptr"), job.v.tensors, strict=True))
    elif job.v is not None:
        args["exp_avg_sq_ptr"] = codes(job.v.tensors[0])
        if len(job.v.tensors) == 2:
            args["exp_avg_sq_scale_ptr"] = job.v.tensors[1]
    return args


def _weight_pointers(fmt: QuantFormat | None, job: _Job) -> dict:
    device = job.grad.device
    quantized = fmt is not None
    return dict(codes_ptr=job.weight.view(torch.uint8) if quantized else job.weight,
                scales_ptr=job.scales if quantized else dummy(torch.float32, device), grad_ptr=job.grad,
                master_ptr=job.master if job.master is not None else dummy(torch.float32, device))


def _check_job(fmt: QuantFormat | None, job: _Job) -> None:
    """Written tensors must be contiguous (the kernels update them in place)."""
    if fmt is not None:
        _check_quantized(job.weight, job.scales, fmt, job.shape)
    else:
        contiguous("param", job.weight, written=True)
    for mo, name in ((job.m, "exp_avg"), (job.v, "exp_avg_sq")):
        for t in (mo.tensors if mo is not None else ()):
            contiguous(name, t, written=True)


class _Factored:
    """The workspace and the two launches that update the factored second moments of some jobs."""

    def __init__(self, jobs: list[_Job]):
        device = jobs[0].grad.device
        items = [(j.shape, j.full_shape or j.shape, j.grad, *j.v.tensors) for j in jobs]
        (self.stats_table, self.final_table, self.slots, self.n_stats, self.n_final, sizes,
         _, self.rows_aligned) = launcher.factored_tables(items)
        self.gmax, self.row_sums, self.col_sums, self.totals = (
            torch.zeros(n, dtype=dtype, device=device)
            for n, dtype in zip(sizes, (torch.int32, torch.int64, torch.int64, torch.int64), strict=True))
        self.jobs = jobs

    def reduce_gmax(self, reduce) -> None:
        """All-reduce ``max |g|`` over the shards (the reference's first reduce of a factored step)."""
        reduce(self.gmax.view(torch.float32), "max")

    def finish(self, scalars: reference.AdamWScalars, reduce=None) -> None:
        """Sum the fixed-point g*g (all-reduced over the shards with ``reduce``) and update row, col, mean."""
        first = self.jobs[0]
        device = first.grad.device
        keys = [launcher.stream_words(j.seed, j.offset)[4:6] for j in self.jobs]
        spec = specs.find_spec("factored_stats", optimizer="adamw", grad_dtype=first.grad.dtype,
                               rows_aligned=self.rows_aligned)
        launcher.launch(spec, (self.n_stats,), grad_ptr=first.grad, gmax_ptr=self.gmax, row_sum_ptr=self.row_sums,
                        col_sum_ptr=self.col_sums, total_ptr=self.totals,
                        table_ptr=launcher.device_table(self.stats_table, self.slots[0], keys, device))
        if reduce is not None:
            reduce(self.col_sums.view(-1, first.shape[-1]), "sum")
            reduce(self.totals, "sum")
        row, col, mean = first.v.tensors
        launcher.launch(specs.find_spec("factored_finalize", optimizer="adamw"), (self.n_final,),
                        gmax_ptr=self.gmax, row_sum_ptr=self.row_sums, col_sum_ptr=self.col_sums,
                        total_ptr=self.totals, row_ptr=row, col_ptr=col, mean_ptr=mean,
                        table_ptr=launcher.device_table(self.final_table, self.slots[1], [(0, 0)] * len(self.jobs),
                                                        device),
                        beta2=float(scalars.beta2), one_minus_beta2=float(scalars.one_minus_beta2))


def _launch_one(optimizer: str, fmt: QuantFormat | None, job: _Job, scalars, inject: float, found: list) -> None:
    """One tensor: one launch (two for row/tensor scales), then the factored second moment's two."""
    device = job.grad.device
    geo = geometry(fmt, job.shape)
    two_pass = len(found) == 2
    n_scale_groups = job.scales.numel() if fmt is not None else 0
    workspace = (torch.zeros(2 * n_scale_groups, dtype=torch.int32, device=device) if two_pass
                 else dummy(torch.int32, device))
    factored = _Factored([job]) if job.factored else None
    w_stride, w_base, m_stride, m_base, v_stride, v_base = launcher.stream_words(job.seed, job.offset)
    args = dict(
        **_weight_pointers(fmt, job), **_state_pointers(job), workspace_ptr=workspace,
        gmax_ptr=factored.gmax if factored else dummy(torch.int32, device), src_ptr=job.grad,
        n_cols=geo["n_cols"], code_cols=geo["code_cols"], rows_per_scale=geo["rows_per_scale"],
        n_scale_groups=n_scale_groups, matrix_rows=launcher.matrix_rows(job.shape), w_stride=w_stride,
        w_base=w_base, m_stride=m_stride, m_base=m_base, v_stride=v_stride, v_base=v_base, inject=inject,
        **scalar_args(scalars),
    )
    for spec in found:
        launcher.launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], spec.constexprs["BLOCK"])), **args)
        if job.reduce is not None and spec is found[0]:  # the order of the reference's reduces
            if factored:
                factored.reduce_gmax(job.reduce)
            if two_pass and fmt.tensorwise:
                absmax = workspace[:n_scale_groups].view(torch.float32).view(-1, 1)
                job.reduce(absmax, "max")
                if geo["rows"] == 0:  # a shard without rows keeps its copy of the matrix's scale current
                    job.scales.copy_(fmt.scale_pair(absmax)[0].view_as(job.scales))
    if factored:
        factored.finish(scalars, job.reduce)


def _launch_many(optimizer: str, fmt: QuantFormat | None, jobs: list[_Job], scalars, inject: float,
                 found: list) -> None:
    """Many small tensors of one format, state formats and dtypes: one launch per pass (``eco_multi_step_kernel``)."""
    first = jobs[0]
    device = first.grad.device
    pointers = [{**_weight_pointers(fmt, j), **_state_pointers(j)} for j in jobs]
    items = [(j.shape, *(p[name] for name in launcher.STEP_POINTERS)) for j, p in zip(jobs, pointers, strict=True)]
    factored = _Factored(jobs) if first.factored else None
    gmax_sizes = [math.prod(j.shape[:-2]) if factored else 0 for j in jobs]
    table, stream_slots, workspace_size, n_programs = launcher.step_table(fmt, found[0].constexprs["BLOCK"], items,
                                                                         gmax_sizes)
    keys = [launcher.stream_words(j.seed, j.offset) for j in jobs]
    args = dict(
        **pointers[0], table_ptr=launcher.device_table(table, stream_slots, keys, device),
        workspace_ptr=(torch.zeros(workspace_size, dtype=torch.int32, device=device) if workspace_size
                       else dummy(torch.int32, device)),
        gmax_ptr=factored.gmax if factored else dummy(torch.int32, device), inject=inject, **scalar_args(scalars),
    )
    for spec in found:  # row/tensor scales: the absmax pass of every tensor, then the storing pass
        launcher.launch(spec, (n_programs,), **args)
    if factored:
        factored.finish(scalars)


def _run(optimizer: str, fmt: QuantFormat | None, jobs: list[_Job], scalars, rounding: str,
         update_weight: bool = True) -> None:
    """Step every job: small ones of one kind in multi-tensor launches, the others one by one (kernel or reference)."""
    groups: dict = {}
    for job in jobs:
        _check_job(fmt, job)
        found = _step_specs("step", optimizer, fmt, job, rounding) if update_weight else None
        if fmt is None and found is not None and job.grad.dtype != job.weight.dtype:
            found = None  # the reference reads such a gradient in its own dtype
        if found is None:
            _reference_step(optimizer, fmt, job, scalars, rounding, update_weight)
            continue
        inject = 0.0 if job.master is not None or fmt is None else float(scalars.inject)
        streams = [t for t in (job.weight, job.scales, job.grad, job.m.tensors[0],
                               job.v.tensors[0] if job.v is not None and not job.factored else None, job.master)
                   if t is not None]
        block_aligned = job.states[0] in ("int8", "fp8") or (job.states[1] in ("fp8", "factored"))
        if job.reduce is None and job.offset == 0 and launcher.groupable(fmt, job.shape, streams, block_aligned):
            key = (job.grad.dtype, job.weight.dtype, tuple(t.dtype for t in job.m.tensors),
                   tuple(t.dtype for t in job.v.tensors) if job.v is not None else None, job.states,
                   job.master is not None, job.grad.device)
            groups.setdefault(key, []).append((job, found, inject))
        else:
            _launch_one(optimizer, fmt, job, scalars, inject, found)
    for members in groups.values():
        job, found, inject = members[0]
        multi = _step_specs("step_multi", optimizer, fmt, job, rounding) if len(members) > 1 else None
        if multi is None:
            for job, found, inject in members:
                _launch_one(optimizer, fmt, job, scalars, inject, found)
        else:
            _launch_many(optimizer, fmt, [j for j, _, _ in members], scalars, inject, multi)


def _check_quantized(codes, scales, fmt, shape):
    if tuple(codes.shape) != tuple(fmt.code_shape(shape)) or tuple(scales.shape) != tuple(fmt.scale_shape(shape)):
        raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not match {fmt} for shape "
                         f"{tuple(shape)}")
    contiguous("codes", codes, written=True)
    contiguous("scales", scales, written=True)


def _quantized_jobs(fmt, rounding, update_weight, codes, scales, grads, ms, vs, masters, shapes, seeds, offsets=None,
                    full_shapes=None, reduces=None):
    check_rounding(rounding)
    check_has_kernel(fmt)
    jobs = []
    where = reference.shard_arguments(len(codes), offsets, full_shapes, reduces)
    for c, s, g, m, v, w, shape, seed, at in zip(codes, scales, grads, ms, vs, masters, shapes, seeds, where,
                                                 strict=True):
        fmt.check_shape(shape)
        jobs.append(_job(c, s, contiguous("grad", g, written=False), m, v, w, shape, seed,
                         stochastic_weight=update_weight and rounding == "stochastic", **at))
    return jobs


# ---------------------------------------------------------------- quantized weights
@torch.no_grad()
def adamw_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq, master: torch.Tensor | None,
    *, fmt: QuantFormat, shape: torch.Size, scalars: reference.AdamWScalars, rounding: str, seed: int | None,
    update_weight: bool = True, offset: int = 0, reduce: reference.Reduce | None = None, full_shape=None,
) -> None:
    """:func:`eco.reference.adamw_step_` as one fused kernel (two launches for row/tensor scales; two more for a
    factored second moment). ``offset``, ``full_shape``, ``reduce``: a dim-0 shard of a larger tensor."""
    jobs = _quantized_jobs(fmt, rounding, update_weight, [codes], [scales], [grad], [exp_avg], [exp_avg_sq],
                           [master], [shape], [seed], [offset], [full_shape], [reduce])
    _run_single("adamw", fmt, jobs[0], scalars, rounding, update_weight)


@torch.no_grad()
def sgd_step_(
    codes: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, momentum_buf, master: torch.Tensor | None, *,
    fmt: QuantFormat, shape: torch.Size, scalars: reference.SGDScalars, rounding: str, seed: int | None,
    update_weight: bool = True, offset: int = 0, reduce: reference.Reduce | None = None, full_shape=None,
) -> None:
    """:func:`eco.reference.sgd_step_` as one fused kernel (two launches for row/tensor scales)."""
    jobs = _quantized_jobs(fmt, rounding, update_weight, [codes], [scales], [grad], [momentum_buf], [None],
                           [master], [shape], [seed], [offset], [full_shape], [reduce])
    _run_single("sgd", fmt, jobs[0], scalars, rounding, update_weight)


def _run_single(optimizer, fmt, job, scalars, rounding, update_weight=True):
    """One tensor on its own launches (never grouped), or on the reference where no kernel covers it."""
    _check_job(fmt, job)
    found = _step_specs("step", optimizer, fmt, job, rounding) if update_weight else None
    if fmt is None and found is not None and job.grad.dtype != job.weight.dtype:
        found = None
    if found is None:
        _reference_step(optimizer, fmt, job, scalars, rounding, update_weight)
        return
    inject = 0.0 if job.master is not None or fmt is None else float(scalars.inject)
    _launch_one(optimizer, fmt, job, scalars, inject, found)


@torch.no_grad()
def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt: QuantFormat, shapes,
                 scalars: reference.AdamWScalars, rounding: str, seeds, update_weight: bool = True, offsets=None,
                 full_shapes=None, reduces=None) -> None:
    """:func:`adamw_step_` for many weights of one format with the same scalars (lists; ``masters`` may hold None).

    Small weights (at most ``launcher.MULTI_TENSOR_MAX_NUMEL`` elements, last
    dimension a multiple of 16, contiguous 16-byte aligned tensors) with the
    same state formats and dtypes share one launch (two for row/tensor
    scales); the others get their own, shards (``offsets``/``full_shapes``/``reduces``) too. Bit for bit the
    results of one :func:`adamw_step_` per weight.
    """
    _run("adamw", fmt, _quantized_jobs(fmt, rounding, update_weight, codes, scales, grads, exp_avgs, exp_avg_sqs,
                                       masters, shapes, seeds, offsets, full_shapes, reduces),
         scalars, rounding, update_weight)


@torch.no_grad()
def sgd_steps_(codes, scales, grads, momentum_bufs, masters, *, fmt: QuantFormat, shapes,
               scalars: reference.SGDScalars, rounding: str, seeds, update_weight: bool = True, offsets=None,
               full_shapes=None, reduces=None) -> None:
    """:func:`sgd_step_` for many weights of one format with the same scalars, grouped as :func:`adamw_steps_`."""
    _run("sgd", fmt, _quantized_jobs(fmt, rounding, update_weight, codes, scales, grads, momentum_bufs,
                                     [None] * len(codes), masters, shapes, seeds, offsets, full_shapes, reduces),
         scalars, rounding, update_weight)


# ---------------------------------------------------------------- the codec
def codec_covers(fmt: QuantFormat, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether :func:`quantize`/:func:`dequantize` run these CUDA tensors (input/output ``dtype``)."""
    return (launcher.has_kernel(fmt) and dtype in specs.GRAD_DTYPES and all(t.is_cuda for t in tensors)
            and launcher.aligned(*tensors))


@torch.no_grad()
def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eco.reference.quantize` as a kernel; returns ``(codes, scales)`` (``x`` must be finite).

    Stochastic rounding draws from the weight stream of ``seed`` (None: one from torch's global generator).
    """
    check_rounding(rounding)
    fmt.check_shape(x.shape)
    check_has_kernel(fmt)
    x = contiguous("x", x, written=False)
    code_dtype = torch.float8_e4m3fn if fmt.name == "fp8" else torch.uint8
    codes = torch.empty(fmt.code_shape(x.shape), dtype=code_dtype, device=x.device)
    scales = torch.empty(fmt.scale_shape(x.shape), dtype=torch.float32, device=x.device)
    device = x.device
    geo = geometry(fmt, x.shape)
    two_pass = fmt.group_size is None
    workspace = (torch.zeros(2 * scales.numel(), dtype=torch.int32, device=device) if two_pass
                 else dummy(torch.int32, device))
    seed = reference._resolve_seed(seed) if rounding == "stochastic" else None
    stride, base = launcher.stream_words(seed, 0)[:2]  # the weight stream is the seed's own
    f32 = dummy(torch.float32, device)
    args = dict(codes_ptr=codes.view(torch.uint8), scales_ptr=scales, workspace_ptr=workspace,
                gmax_ptr=dummy(torch.int32, device), grad_ptr=f32, exp_avg_ptr=f32, exp_avg_scale_ptr=f32,
                exp_avg_sq_ptr=f32, exp_avg_sq_scale_ptr=f32, v_row_ptr=f32, v_col_ptr=f32, v_mean_ptr=f32,
                master_ptr=f32, src_ptr=x, n_cols=geo["n_cols"], code_cols=geo["code_cols"],
                rows_per_scale=geo["rows_per_scale"], n_scale_groups=scales.numel(), matrix_rows=1,
                w_stride=stride, w_base=base, m_stride=0, m_base=0, v_stride=0, v_base=0, inject=0.0,
                **scalar_args(None))
    for pass_ in ((0, 1) if two_pass else (1,)):
        spec = specs.find_spec("quantize", format=fmt.config(), rounding=rounding, grad_dtype=x.dtype, pass_=pass_)
        if spec is None:
            raise ValueError(f"no quantize kernel for {fmt} from {x.dtype}; supported inputs: {specs.GRAD_DTYPES}")
        launcher.launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], spec.constexprs["BLOCK"])), **args)
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
def _plain_flat_spec(kernel: str, optimizer: str, job: _Job):
    """The flat plain kernel of a job whose moments are one dense dtype (fp32 or bf16), or None."""
    m, v = job.states
    if m not in specs.PLAIN_STATES or (v is not None and v != m) or job.grad.dtype != job.weight.dtype:
        return None
    return specs.find_spec(kernel, optimizer=optimizer, states=job.states, grad_dtype=job.weight.dtype)


def _plain_single(optimizer: str, job: _Job, scalars, spec) -> None:
    _, _, m_stride, m_base, v_stride, v_base = launcher.stream_words(job.seed, job.offset)
    v = job.v.tensors[0] if job.v is not None else dummy(job.m.tensors[0].dtype, job.grad.device)
    launcher.launch(spec, (triton.cdiv(job.weight.numel(), spec.constexprs["BLOCK"]),), param_ptr=job.weight,
                    grad_ptr=job.grad, exp_avg_ptr=job.m.tensors[0], exp_avg_sq_ptr=v, numel=job.weight.numel(),
                    m_stride=m_stride, m_base=m_base, v_stride=v_stride, v_base=v_base, **scalar_args(scalars))


def _plain_run(optimizer: str, jobs: list[_Job], scalars) -> None:
    """Dense states: small same-dtype tensors share one flat launch per group, big ones get their own. Other
    state formats: the step kernel's tiles (:func:`_run`), or the reference.

    Only tensors whose numel is a multiple of 16 are grouped: the multi-tensor
    kernel is compiled for 128-bit accesses, which a ragged end would break.
    """
    groups: dict = {}
    others = []
    for job in jobs:
        spec = _plain_flat_spec("plain", optimizer, job)
        if spec is None:
            others.append(job)
            continue
        _check_job(None, job)
        v = job.v.tensors[0] if job.v is not None else None
        if (job.weight.numel() > launcher.MULTI_TENSOR_MAX_NUMEL or job.weight.numel() % 16 or job.offset
                or not launcher.aligned(job.weight, job.grad, job.m.tensors[0], v)):
            _plain_single(optimizer, job, scalars, spec)
        else:
            groups.setdefault((job.weight.dtype, job.states, job.weight.device), []).append(job)
    for members in groups.values():
        spec = _plain_flat_spec("plain_multi", optimizer, members[0]) if len(members) > 1 else None
        if spec is None:
            for job in members:
                _plain_single(optimizer, job, scalars, _plain_flat_spec("plain", optimizer, job))
            continue
        lists = [[j.weight for j in members], [j.grad for j in members], [j.m.tensors[0] for j in members],
                 [(j.v or j.m).tensors[0] for j in members]]
        block = spec.constexprs["BLOCK"]
        n_programs = sum(triton.cdiv(j.weight.numel(), block) for j in members)
        table, slots = launcher.plain_table(*lists, block)
        keys = [launcher.stream_words(j.seed, j.offset)[2:] for j in members]
        launcher.launch(spec, (n_programs,), param_ptr=lists[0][0], grad_ptr=lists[1][0], exp_avg_ptr=lists[2][0],
                        exp_avg_sq_ptr=lists[3][0],
                        table_ptr=launcher.device_table(table, slots, keys, members[0].grad.device),
                        **scalar_args(scalars))
    if others:
        _run(optimizer, None, others, scalars, "nearest")


def _plain_jobs(params, grads, ms, vs, seeds, offsets=None, full_shapes=None, reduces=None) -> list[_Job]:
    where = reference.shard_arguments(len(params), offsets, full_shapes, reduces)
    return [_job(p, None, contiguous("grad", g, written=False), m, v, None, p.shape, seed, stochastic_weight=False,
                 **at)
            for p, g, m, v, seed, at in zip(params, grads, ms, vs, seeds or [None] * len(params), where, strict=True)]


@torch.no_grad()
def plain_adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq, *,
                      scalars: reference.AdamWScalars, seed: int | None = None, offset: int = 0,
                      reduce: reference.Reduce | None = None, full_shape=None) -> None:
    """:func:`eco.reference.plain_adamw_step_` as a kernel."""
    job = _plain_jobs([param], [grad], [exp_avg], [exp_avg_sq], [seed], [offset], [full_shape], [reduce])[0]
    _plain_one("adamw", job, scalars)


@torch.no_grad()
def plain_sgd_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buf, *, scalars: reference.SGDScalars,
                    seed: int | None = None, offset: int = 0, reduce: reference.Reduce | None = None,
                    full_shape=None) -> None:
    """:func:`eco.reference.plain_sgd_step_` as a kernel."""
    job = _plain_jobs([param], [grad], [momentum_buf], [None], [seed], [offset], [full_shape], [reduce])[0]
    _plain_one("sgd", job, scalars)


def _plain_one(optimizer: str, job: _Job, scalars) -> None:
    spec = _plain_flat_spec("plain", optimizer, job)
    if spec is None:
        _run_single(optimizer, None, job, scalars, "nearest")
    else:
        _check_job(None, job)
        _plain_single(optimizer, job, scalars, spec)


@torch.no_grad()
def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars: reference.AdamWScalars,
                       seeds=None, offsets=None, full_shapes=None, reduces=None) -> None:
    """:func:`plain_adamw_step_` for many tensors with the same scalars, small ones grouped into few launches."""
    _plain_run("adamw", _plain_jobs(params, grads, exp_avgs, exp_avg_sqs, seeds, offsets, full_shapes, reduces),
               scalars)


@torch.no_grad()
def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars: reference.SGDScalars, seeds=None, offsets=None,
                     full_shapes=None, reduces=None) -> None:
    """:func:`plain_sgd_step_` for many tensors with the same scalars, small ones grouped into few launches."""
    _plain_run("sgd", _plain_jobs(params, grads, momentum_bufs, [None] * len(params), seeds, offsets, full_shapes,
                                  reduces), scalars)
