"""Fused Triton kernels for the ECO step (installed as ``eco.kernels``).

Same functions, same signatures as ``eco.reference`` (``adamw_step_``,
``sgd_step_``, ``plain_adamw_step_``, ``plain_sgd_step_`` and their batched
forms ``adamw_steps_``, ``sgd_steps_``, ``plain_adamw_steps_``,
``plain_sgd_steps_``), plus ``quantize`` and ``dequantize``. The optimizer
uses them for CUDA tensors (:func:`supports`); ``backend="reference"`` or
``ECO_BACKEND=reference`` forces the reference path. Under ``TRITON_INTERPRET=1`` they also run on CPU
tensors (slowly: this is how the tests prove them against the reference), and
``eco.AdamW(..., backend="triton")`` then routes CPU parameters here.

One step of a quantized weight is one pass: load gradient, codes, scales, m, v;
dequantize; AdamW/SGD in fp32; quantize (nearest or stochastic); error; inject
into m; store codes, scales, m, v. Block/group formats do that in a single
launch. Row-wise FP8 and tensor-wise INT4 need the new absmax of the whole
row/matrix before anything can be quantized, so they take two launches: pass 0
reads g, codes, m, v, computes ``w~`` and reduces ``|w~|`` (atomic max per
row/matrix); pass 1 re-reads the same inputs, recomputes the identical ``w~``,
quantizes and stores. Nothing full-size is written between the passes (the
workspace is 8 bytes per row or matrix).

HBM bytes moved per parameter per step (bf16 gradient; scales add
``8 / group`` bytes, e.g. 0.06 for 128-blocks, 0.25 for INT4 groups of 32, ~0 for
row/tensor; second-pass re-reads counted in full, the worst case when the
tensor does not stay in L2):

=================  =========  ==================  ==================
optimizer, state   format     block/group scales  row/tensor scales
=================  =========  ==================  ==================
AdamW, bf16 m, v   FP8        12                  19 (+7 re-read)
AdamW, bf16 m, v   INT4       11                  17.5 (+6.5)
AdamW, fp32 m, v   FP8        20                  31 (+11)
AdamW, fp32 m, v   INT4       19                  29.5 (+10.5)
SGD, bf16 m        FP8        8                   13 (+5)
SGD, bf16 m        INT4       7                   11.5 (+4.5)
SGD, fp32 m        FP8        12                  19 (+7)
SGD, fp32 m        INT4       11                  17.5 (+6.5)
=================  =========  ==================  ==================

(AdamW FP8 bf16: read g 2 + codes 1 + m 2 + v 2, write codes 1 + m 2 + v 2.)
With an fp32 gradient add 2 (4 on row/tensor formats). For comparison, torch
AdamW with fp32 master weights, bf16 model weights and bf16 gradients moves 28:
read g 2, master 4, m 4, v 4; write master 4, m 4, v 4, bf16 weight 2.
Plain parameters: AdamW reads p, g, m, v and writes p, m, v (28 bytes with
fp32 everything, 16 with bf16 param and bf16 states).

Many small tensors, few launches: the batched functions (what the optimizer
calls) put tensors of up to ``MULTI_TENSOR_MAX_NUMEL`` elements that share
dtypes (quantized: also format and master flag) into one launch of a
multi-tensor kernel (``eco_step.plain_multi_step_kernel``,
``eco_step.eco_multi_step_kernel``: the same tile code as the single-tensor
kernels; an int64 table names each program's tensor and tile and each tensor's
offsets). Row-wise FP8 and tensor-wise INT4 take two such launches (the absmax
pass of every tensor, then the storing pass; one workspace). Only tensors whose
storages are 16-byte aligned and whose last dimension (plain: numel) is a
multiple of 16 are grouped, so that the accesses stay 128-bit; the others, and
larger tensors, get their own launch. Block/group formats tile each tensor
as one flat row, so narrow matrices fill whole tiles (the 128- and 256-column
experts below: 6144 programs of 2048 elements instead of 65536 of one row
each). The bits are those of one launch per tensor (seeds are per tensor).
Counted by ``bench/launch_count.py``: 4 layers of 32 experts with three
128x256 linears each step in 2 launches (3 with row/tensor scales) instead of
385 (769). What that saves in time needs a GPU and was not measured.

Each launch compiles for its device (the ``TARGET`` constexpr, see
``specs.KernelSpec.constexprs_for``): sm_89+ (H100, B200) converts E4M3 with
its conversion instructions, sm_80 (A100) and the interpreter on the bits
(``e4m3``); the codes are the same. Stochastic rounding draws one 7-round
Philox call per four elements (``eco_step.tile_random_bits``).

Not run as kernels (they go to ``eco.reference`` on the same device):
``update_weight=False`` (``lr == 0``: moments only, a rare step), formats
whose group size has no kernel (see ``specs.GROUP_SIZES``), fp16 parameters.
"""

from __future__ import annotations

import math
import os

import torch

from eco import reference
from eco.formats import QuantFormat, check_rounding

try:
    import triton

    from . import eco_step, specs
    from .specs import SPECS, KernelSpec, find_spec

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    SPECS, KernelSpec, find_spec = [], None, None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

#: plain tensors up to this many elements share multi-tensor launches; larger ones get their own
MULTI_TENSOR_MAX_NUMEL = 1 << 18

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                    torch.int32: "i32", torch.int64: "i64"}


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str:
    """Why :func:`supports` says no for a CPU tensor (or '' when triton is importable)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    return "the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1 with backend='triton')"


def has_kernel(fmt: QuantFormat) -> bool:
    """Whether a kernel specialization exists for this format (group sizes in ``specs.GROUP_SIZES``)."""
    return triton is not None and fmt.config() in specs.format_configs()


def supports(param: torch.Tensor, interpreted: bool = False) -> bool:
    """Whether the kernels run this parameter's step.

    True for CUDA tensors when triton imports (and, for a quantized weight, its
    format has a kernel). ``interpreted=True`` also accepts CPU tensors when
    ``TRITON_INTERPRET=1``: the tests' way to run the kernel path without a GPU.
    """
    if triton is None or param.dtype not in specs.GRAD_DTYPES:
        return False
    fmt = getattr(param, "fmt", None)
    if fmt is not None and not has_kernel(fmt):
        return False
    if param.device.type == "cuda":
        return True
    return interpreted and interpreter_enabled() and param.device.type == "cpu"


# ---------------------------------------------------------------- bytes moved
def step_bytes(fmt: QuantFormat, shape, *, optimizer: str = "adamw", state_dtype=torch.bfloat16,
               grad_dtype=torch.bfloat16) -> int:
    """HBM bytes one fused step of a quantized weight moves (the model behind the module docstring's table).

    Reads gradient, codes, scales and moments; writes codes, scales and
    moments. Row-wise FP8 and tensor-wise INT4 read gradient, codes and
    moments a second time (pass 0), counted in full.
    """
    n = math.prod(shape)
    codes = math.prod(fmt.code_shape(shape))
    scales = 4 * math.prod(fmt.scale_shape(shape))
    grad = n * torch.finfo(grad_dtype).bits // 8
    moments = n * torch.finfo(state_dtype).bits // 8 * (2 if optimizer == "adamw" else 1)
    total = (grad + codes + moments + scales) + (codes + moments + scales)
    if fmt.row_group is None:
        total += grad + codes + moments + scales
    return total


def plain_step_bytes(numel: int, *, optimizer: str = "adamw", param_dtype=torch.float32, grad_dtype=None,
                     state_dtype=torch.float32) -> int:
    """HBM bytes of a plain (unquantized) step: read p, g, m(, v); write p, m(, v)."""
    size = lambda dtype: torch.finfo(dtype).bits // 8
    moments = numel * size(state_dtype) * (2 if optimizer == "adamw" else 1)
    return 2 * numel * size(param_dtype) + numel * size(grad_dtype or param_dtype) + 2 * moments


# ---------------------------------------------------------------- launching
def _triton_type(t: torch.Tensor) -> str:
    return "*" + _TORCH_TO_TRITON.get(t.dtype, str(t.dtype))


def launch(spec: KernelSpec, grid: tuple, **args) -> None:
    """Launch ``spec`` with exactly its signature: pointer dtypes and 16-byte alignment are checked."""
    for name, typ in spec.signature.items():
        if typ == "constexpr":
            continue
        value = args[name]
        if typ.startswith("*"):
            if _triton_type(value) != typ:
                raise TypeError(f"kernel {spec.name}: {name} must be {typ}, got a {value.dtype} tensor")
            if value.data_ptr() % 16:
                raise ValueError(f"kernel {spec.name}: {name} is not 16-byte aligned; pass a fresh (cloned) tensor")
    if math.prod(grid) == 0:
        return
    constexprs = spec.constexprs_for(_capability(next(v for v in args.values() if isinstance(v, torch.Tensor))))
    spec.fn[grid](**args, **constexprs, num_warps=spec.num_warps, **spec.options)


_CAPABILITIES: dict = {}


def _capability(t: torch.Tensor) -> int:
    """The ``TARGET`` constexpr for a launch on ``t``'s device: 90 for an H100, 0 on the interpreter."""
    if t.device.type != "cuda" or interpreter_enabled():
        return 0
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        major, minor = torch.cuda.get_device_capability(index)
        _CAPABILITIES[index] = 10 * major + minor
    return _CAPABILITIES[index]


_DUMMIES: dict = {}


def _dummy(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-element tensor for pointer arguments a specialization never touches."""
    key = (dtype, str(device))
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(4, dtype=dtype, device=device)
    return _DUMMIES[key]


def _contiguous(name: str, t: torch.Tensor, *, written: bool) -> torch.Tensor:
    if t.is_contiguous():
        return t
    if written:
        raise ValueError(f"{name} must be contiguous: the kernels update it in place")
    return t.contiguous()


def _geometry(fmt: QuantFormat, shape) -> dict:
    rows = math.prod(shape[:-1])
    rows_per_scale = shape[-2] if fmt.tensorwise else 1
    return dict(rows=rows, n_cols=shape[-1], code_cols=fmt.code_shape(shape)[-1], rows_per_scale=rows_per_scale)


def _run_step(kind, *, codes, scales, grad, exp_avg, exp_avg_sq, master, src, fmt, shape, k, inject,
              rounding, seed, state_dtype, grad_dtype, optimizer):
    """``master`` is the fp32 master copy or None; unused pointers get small dummies."""
    check_rounding(rounding)
    fmt.check_shape(shape)
    if not has_kernel(fmt):
        raise ValueError(f"no kernel for {fmt}; group sizes with kernels: {specs.GROUP_SIZES}. "
                         "Use backend='reference' for this weight")
    geo = _geometry(fmt, shape)
    gs = fmt.row_group
    two_pass = gs is None
    device = codes.device
    has_master = master is not None
    master = master if has_master else _dummy(torch.float32, device)
    workspace = (torch.zeros(2 * scales.numel(), dtype=torch.int32, device=device) if two_pass
                 else _dummy(torch.int32, device))
    args = dict(
        codes_ptr=codes.view(torch.uint8), scales_ptr=scales, workspace_ptr=workspace, grad_ptr=grad,
        exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq, master_ptr=master, src_ptr=src,
        n_cols=geo["n_cols"], code_cols=geo["code_cols"], rows_per_scale=geo["rows_per_scale"],
        n_scale_groups=scales.numel(), seed=int(seed or 0), inject=float(inject),
        **{f"k{i}": float(x) for i, x in enumerate(k)},
    )
    for pass_ in ((0, 1) if two_pass else (1,)):
        spec = find_spec(kind, optimizer=optimizer, format=fmt.config(), rounding=rounding, state_dtype=state_dtype,
                         grad_dtype=grad_dtype, master=has_master, pass_=pass_)
        if spec is None:
            raise ValueError(f"no {kind} kernel for {optimizer} {fmt} with state {state_dtype} and gradient/input "
                             f"{grad_dtype}; supported: {specs.STATE_DTYPES} states, {specs.GRAD_DTYPES} gradients")
        block = spec.constexprs["BLOCK"]
        launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], block)), **args)


def _check_quantized(codes, scales, fmt, shape):
    if tuple(codes.shape) != tuple(fmt.code_shape(shape)) or tuple(scales.shape) != tuple(fmt.scale_shape(shape)):
        raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not match {fmt} for shape "
                         f"{tuple(shape)}")
    _contiguous("codes", codes, written=True)
    _contiguous("scales", scales, written=True)


# ---------------------------------------------------------------- the optimizer's functions
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
    grad = _contiguous("grad", grad, written=False)
    s = scalars
    k = (s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.inv_bc2, s.eps, s.decay, s.step_size)
    _run_step("step", codes=codes, scales=scales, grad=grad, exp_avg=_contiguous("exp_avg", exp_avg, written=True),
              exp_avg_sq=_contiguous("exp_avg_sq", exp_avg_sq, written=True),
              master=master, src=grad, fmt=fmt,
              shape=shape, k=k, inject=0.0 if master is not None else s.inject, rounding=rounding, seed=seed,
              state_dtype=exp_avg.dtype, grad_dtype=grad.dtype, optimizer="adamw")


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
    grad = _contiguous("grad", grad, written=False)
    s = scalars
    momentum_buf = _contiguous("momentum_buf", momentum_buf, written=True)
    _run_step("step", codes=codes, scales=scales, grad=grad, exp_avg=momentum_buf, exp_avg_sq=momentum_buf,
              master=master, src=grad, fmt=fmt,
              shape=shape, k=(s.beta, s.one_minus_beta, s.weight_decay, s.lr, 0.0, 0.0, 0.0, 0.0),
              inject=0.0 if master is not None else s.inject, rounding=rounding, seed=seed,
              state_dtype=momentum_buf.dtype, grad_dtype=grad.dtype, optimizer="sgd")


# ---------------------------------------------------------------- many quantized weights at once
_STEP_TABLES: dict = {}
_DEVICE_TABLES: dict = {}


def _step_table(fmt: QuantFormat, block: int, items: list) -> tuple:
    """The int64 table of :func:`eco_step.eco_multi_step_kernel` (seeds 0) on the host, cached per set of tensors.

    ``items`` are ``(shape, codes, scales, grad, exp_avg, exp_avg_sq, master)``.
    Returns ``(table, seed slots, workspace int32 elements, programs)``.
    """
    key = (fmt, block, tuple((tuple(shape), *((t.data_ptr(), t.dtype) for t in ts)) for shape, *ts in items))
    cached = _STEP_TABLES.get(key)
    if cached is not None:
        return cached
    programs, entries, workspace = [], [], 0
    firsts = items[0][1:]
    for index, (shape, *tensors) in enumerate(items):
        # Block/group formats: the tensor as one row of numel elements (its groups never straddle rows, and
        # the random bits of element i are those of the per-row tiling: counter i // 4), so that narrow
        # matrices fill whole tiles. Row/tensor scales need real rows.
        geo = _geometry(fmt, shape if fmt.row_group is None else (1, math.prod(shape)))
        tiles = triton.cdiv(geo["n_cols"], block)
        linear = torch.arange(geo["rows"] * tiles, dtype=torch.int64)
        programs.append(torch.stack((torch.full_like(linear, index), linear // tiles, linear % tiles), dim=1))
        codes, scales, *streams = [(t.data_ptr() - first.data_ptr()) // first.element_size()
                                   for t, first in zip(tensors, firsts, strict=True)]
        n_scale_groups = tensors[1].numel()
        entries.append([geo["n_cols"], geo["code_cols"], geo["rows_per_scale"], n_scale_groups, 0, codes, scales,
                        workspace, *streams])
        if fmt.row_group is None:
            workspace += 2 * n_scale_groups
    program_table = torch.cat(programs).reshape(-1)
    words = eco_step.MULTI_TENSOR_WORDS.value
    assert len(entries[0]) == words
    seed_slots = [program_table.numel() + words * i + 4 for i in range(len(items))]
    table = torch.cat([program_table, torch.tensor(entries, dtype=torch.int64).reshape(-1)])
    if len(_STEP_TABLES) > 64:
        _STEP_TABLES.clear()
    cached = _STEP_TABLES[key] = (table, seed_slots, workspace, program_table.numel() // 3)
    return cached


def _device_table(table: torch.Tensor, seed_slots: list[int], seeds: list[int], device) -> torch.Tensor:
    """``table`` on ``device`` with the seeds written in; cached while they are all 0 (round-to-nearest)."""
    if any(seeds):
        table = table.clone()
        table[seed_slots] = torch.tensor(seeds, dtype=torch.int64)
        return table.to(device)
    key = (id(table), str(device))
    cached = _DEVICE_TABLES.get(key)
    if cached is None or cached[0] is not table:
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        cached = _DEVICE_TABLES[key] = (table, table.to(device))
    return cached[1]


def _groupable(fmt: QuantFormat, shape, codes, scales, grad, *others) -> bool:
    """Whether a weight may share a multi-tensor launch: small, last dim a multiple of 16 (so every
    stream's rows start 16-byte aligned), contiguous 16-byte aligned tensors of the expected sizes."""
    return (math.prod(shape) <= MULTI_TENSOR_MAX_NUMEL and len(shape) >= 2 and shape[-1] % 16 == 0
            and tuple(codes.shape) == tuple(fmt.code_shape(shape))
            and tuple(scales.shape) == tuple(fmt.scale_shape(shape)) and grad.numel() == math.prod(shape)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (codes, scales, grad, *others)
                    if t is not None))


def _step_many(optimizer, single, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt, shapes, k, inject,
               rounding, seeds) -> None:
    """Small qualifying weights of the same dtypes: one launch per group and pass; ``single(i)`` steps the rest.

    ``inject`` is the injection of weights without a master copy (with one: 0).
    """
    check_rounding(rounding)
    if not has_kernel(fmt):
        raise ValueError(f"no kernel for {fmt}; group sizes with kernels: {specs.GROUP_SIZES}. "
                         "Use backend='reference' for this weight")
    groups: dict = {}
    for i, (c, s, g, m, v, w, shape) in enumerate(zip(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, shapes,
                                                      strict=True)):
        fmt.check_shape(shape)
        if _groupable(fmt, shape, c, s, g, m, v, w) and (w is None or w.dtype == torch.float32):
            groups.setdefault((g.dtype, m.dtype, w is not None, c.device), []).append(i)
        else:
            single(i)
    for (grad_dtype, state_dtype, has_master, device), members in groups.items():
        if len(members) == 1:
            single(members[0])
            continue
        found = [find_spec("step_multi", optimizer=optimizer, format=fmt.config(), rounding=rounding,
                           state_dtype=state_dtype, grad_dtype=grad_dtype, master=has_master, pass_=pass_)
                 for pass_ in ((1,) if fmt.row_group else (0, 1))]
        if None in found:
            raise ValueError(f"no {optimizer} kernel for {fmt} with state {state_dtype} and gradient {grad_dtype}; "
                             f"supported: {specs.STATE_DTYPES} states, {specs.GRAD_DTYPES} gradients")
        master_dummy = _dummy(torch.float32, device)
        items = [(shapes[i], codes[i].view(torch.uint8), scales[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                  masters[i] if has_master else master_dummy) for i in members]
        table, seed_slots, workspace_size, n_programs = _step_table(fmt, found[0].constexprs["BLOCK"], items)
        _, codes0, scales0, grad0, exp_avg0, exp_avg_sq0, master0 = items[0]
        args = dict(
            codes_ptr=codes0, scales_ptr=scales0, grad_ptr=grad0, exp_avg_ptr=exp_avg0, exp_avg_sq_ptr=exp_avg_sq0,
            master_ptr=master0, table_ptr=_device_table(table, seed_slots, [int(seeds[i] or 0) for i in members],
                                                        device),
            workspace_ptr=(torch.zeros(workspace_size, dtype=torch.int32, device=device) if workspace_size
                           else _dummy(torch.int32, device)),
            inject=0.0 if has_master else float(inject), **{f"k{i}": float(x) for i, x in enumerate(k)},
        )
        for spec in found:  # row/tensor scales: the absmax pass of every tensor, then the storing pass
            launch(spec, (n_programs,), **args)


@torch.no_grad()
def adamw_steps_(codes, scales, grads, exp_avgs, exp_avg_sqs, masters, *, fmt: QuantFormat, shapes,
                 scalars: reference.AdamWScalars, rounding: str, seeds, update_weight: bool = True) -> None:
    """:func:`adamw_step_` for many weights of one format with the same scalars (lists; ``masters`` may hold None).

    Small weights (at most ``MULTI_TENSOR_MAX_NUMEL`` elements, last dimension a
    multiple of 16, contiguous 16-byte aligned tensors) with the same dtypes
    share one launch (two for row/tensor scales); the others get their own.
    Bit for bit the results of one :func:`adamw_step_` per weight with its seed.
    """
    def single(i):
        adamw_step_(codes[i], scales[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], fmt=fmt, shape=shapes[i],
                    scalars=scalars, rounding=rounding, seed=seeds[i], update_weight=update_weight)

    if not update_weight:  # moments only, on the reference (as adamw_step_)
        for i in range(len(codes)):
            single(i)
        return
    s = scalars
    _step_many("adamw", single, codes, scales, grads, exp_avgs, exp_avg_sqs, masters, fmt=fmt, shapes=shapes,
               k=(s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.inv_bc2, s.eps, s.decay, s.step_size),
               inject=s.inject, rounding=rounding, seeds=seeds)


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
    s = scalars
    _step_many("sgd", single, codes, scales, grads, momentum_bufs, momentum_bufs, masters, fmt=fmt, shapes=shapes,
               k=(s.beta, s.one_minus_beta, s.weight_decay, s.lr, 0.0, 0.0, 0.0, 0.0), inject=s.inject,
               rounding=rounding, seeds=seeds)


@torch.no_grad()
def quantize(x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest",
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`QuantFormat.quantize` as a kernel; returns ``(codes, scales)`` (``x`` must be finite)."""
    fmt.check_shape(x.shape)
    x = _contiguous("x", x, written=False)
    code_dtype = torch.float8_e4m3fn if fmt.name == "fp8" else torch.uint8
    codes = torch.empty(fmt.code_shape(x.shape), dtype=code_dtype, device=x.device)
    scales = torch.empty(fmt.scale_shape(x.shape), dtype=torch.float32, device=x.device)
    f32 = _dummy(torch.float32, x.device)
    _run_step("quantize", codes=codes, scales=scales, grad=f32, exp_avg=f32, exp_avg_sq=f32, master=None, src=x,
              fmt=fmt, shape=x.shape, k=(0.0,) * 8, inject=0.0, rounding=rounding, seed=seed, state_dtype=None,
              grad_dtype=x.dtype, optimizer=None)
    return codes, scales


@torch.no_grad()
def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:meth:`QuantFormat.dequantize` as a kernel."""
    _check_quantized(codes, scales, fmt, shape)
    spec = find_spec("dequantize", format=fmt.config(), out_dtype=dtype) if has_kernel(fmt) else None
    if spec is None:
        raise ValueError(f"no dequantize kernel for {fmt} to {dtype}; use fmt.dequantize")
    out = torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    geo = _geometry(fmt, shape)
    launch(spec, (geo["rows"], triton.cdiv(geo["n_cols"], spec.constexprs["BLOCK"])),
           codes_ptr=codes.view(torch.uint8), scales_ptr=scales, out_ptr=out, n_cols=geo["n_cols"],
           code_cols=geo["code_cols"], rows_per_scale=geo["rows_per_scale"])
    return out


def _kernel_covers(fmt: QuantFormat, *tensors: torch.Tensor) -> bool:
    """Whether the quantize/dequantize kernels run these CUDA tensors (else the format's torch code does)."""
    return (all(t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
            and triton is not None and os.environ.get("ECO_BACKEND") != "reference" and has_kernel(fmt))


def format_quantize(fmt: QuantFormat, x: torch.Tensor, rounding: str = "nearest", generator=None):
    """``fmt.quantize`` on the kernel for CUDA tensors (nearest rounding; a torch generator means the format's code)."""
    if rounding == "nearest" and generator is None and x.dtype in specs.GRAD_DTYPES and _kernel_covers(fmt, x):
        return quantize(x, fmt)
    return fmt.quantize(x, rounding, generator)


def format_dequantize(fmt: QuantFormat, codes: torch.Tensor, scales: torch.Tensor, shape, dtype: torch.dtype):
    """``fmt.dequantize`` on the kernel for CUDA tensors (the forward pass of a quantized weight)."""
    if dtype in specs.GRAD_DTYPES and _kernel_covers(fmt, codes, scales):
        return dequantize(codes, scales, fmt, shape, dtype)
    return fmt.dequantize(codes, scales, shape, dtype)


# ---------------------------------------------------------------- plain parameters
def _plain_k(optimizer: str, s) -> tuple:
    if optimizer == "adamw":
        return (s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.inv_bc2, s.eps, s.decay, s.step_size)
    return (s.beta, s.one_minus_beta, s.weight_decay, s.lr, 0.0, 0.0, 0.0, 0.0)


def _plain_spec(kernel: str, optimizer: str, param: torch.Tensor, state: torch.Tensor) -> KernelSpec:
    spec = find_spec(kernel, optimizer=optimizer, state_dtype=state.dtype, grad_dtype=param.dtype)
    if spec is None:
        raise ValueError(f"no plain {optimizer} kernel for a {param.dtype} parameter with {state.dtype} state; "
                         f"supported: {specs.GRAD_DTYPES} parameters, {specs.STATE_DTYPES} states")
    return spec


def _plain_single(optimizer, param, grad, exp_avg, exp_avg_sq, scalars):
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    spec = _plain_spec("plain", optimizer, param, exp_avg)
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _contiguous(name, t, written=True)
    args = {f"k{i}": float(x) for i, x in enumerate(_plain_k(optimizer, scalars))}
    launch(spec, (triton.cdiv(param.numel(), spec.constexprs["BLOCK"]),), param_ptr=param,
           grad_ptr=_contiguous("grad", grad, written=False), exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq,
           numel=param.numel(), **args)


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


_TABLES: dict = {}


def _multi_table(params, grads, exp_avgs, exp_avg_sqs, block: int) -> torch.Tensor:
    """The int64 launch table of :func:`eco_step.plain_multi_step_kernel`, cached per set of tensors."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    key = (block, tuple((t.data_ptr(), t.numel()) for ts in lists for t in ts))
    table = _TABLES.get(key)
    if table is None:
        programs, entries = [], []
        for index, p in enumerate(params):
            programs += [(index, start) for start in range(0, p.numel(), block)]
            offsets = []
            for ts in lists:
                delta = ts[index].data_ptr() - ts[0].data_ptr()
                offsets.append(delta // ts[0].element_size())
            entries.append((p.numel(), *offsets))
        flat = [x for pair in programs for x in pair] + [x for entry in entries for x in entry]
        table = torch.tensor(flat, dtype=torch.int64).to(params[0].device)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


def _plain_many(optimizer, params, grads, exp_avgs, exp_avg_sqs, scalars):
    """Group small same-dtype tensors into one launch each; big ones get their own.

    Only tensors whose numel is a multiple of 16 (every hidden size) are grouped: the
    multi-tensor kernel is compiled for 128-bit accesses, which a ragged end would break.
    """
    groups: dict = {}
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if p.numel() > MULTI_TENSOR_MAX_NUMEL or p.numel() % 16 or g.dtype != p.dtype or not all(
                t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (p, g, m, v)):
            _plain_single(optimizer, p, g, m, v, scalars)
            continue
        groups.setdefault((p.dtype, m.dtype, p.device), []).append((p, g, m, v))
    args = {f"k{i}": float(x) for i, x in enumerate(_plain_k(optimizer, scalars))}
    for items in groups.values():
        if len(items) == 1:
            _plain_single(optimizer, *items[0], scalars)
            continue
        ps, gs, ms, vs = (list(x) for x in zip(*items, strict=True))
        spec = _plain_spec("plain_multi", optimizer, ps[0], ms[0])
        block = spec.constexprs["BLOCK"]
        table = _multi_table(ps, gs, ms, vs, block)
        n_programs = sum(triton.cdiv(p.numel(), block) for p in ps)
        launch(spec, (n_programs,), param_ptr=ps[0], grad_ptr=gs[0], exp_avg_ptr=ms[0], exp_avg_sq_ptr=vs[0],
               table_ptr=table, **args)


@torch.no_grad()
def plain_adamw_steps_(params, grads, exp_avgs, exp_avg_sqs, *, scalars: reference.AdamWScalars) -> None:
    """:func:`plain_adamw_step_` for many tensors with the same scalars, small ones grouped into few launches."""
    _plain_many("adamw", params, grads, exp_avgs, exp_avg_sqs, scalars)


@torch.no_grad()
def plain_sgd_steps_(params, grads, momentum_bufs, *, scalars: reference.SGDScalars) -> None:
    """:func:`plain_sgd_step_` for many tensors with the same scalars, small ones grouped into few launches."""
    _plain_many("sgd", params, grads, momentum_bufs, momentum_bufs, scalars)


__all__ = [
    "SPECS", "KernelSpec", "find_spec", "supports", "unavailable_reason", "interpreter_enabled", "has_kernel",
    "adamw_step_", "sgd_step_", "adamw_steps_", "sgd_steps_", "plain_adamw_step_", "plain_sgd_step_",
    "plain_adamw_steps_", "plain_sgd_steps_",
    "quantize", "dequantize", "format_quantize", "format_dequantize", "launch", "step_bytes", "plain_step_bytes",
]
