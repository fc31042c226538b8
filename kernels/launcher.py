"""Launching the kernels: availability, the checked launch, kernel arguments and the multi-tensor tables.

Every launch goes through :func:`launch`: the arguments must match the
specialization's signature (pointer dtypes, 16-byte alignment), the kernel is
compiled for the tensor's device (the ``TARGET`` constexpr) and runs under
that device's guard, so a tensor on ``cuda:1`` is not stepped on ``cuda:0``.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from eco import reference
from eco.formats import QuantFormat

try:
    import triton

    from . import eco_step, specs

    IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = eco_step = specs = None
    IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

#: tensors up to this many elements share multi-tensor launches; larger ones get their own
MULTI_TENSOR_MAX_NUMEL = 1 << 18

#: The step kernels' fp32 scalar arguments ``k0..k7``: which field of the host scalars each carries.
SCALAR_SLOTS = {
    reference.AdamWScalars: ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bc2", "eps", "decay",
                             "step_size"),
    reference.SGDScalars: ("beta", "one_minus_beta", "weight_decay", "lr"),
}
N_SCALAR_SLOTS = 8


def scalar_args(scalars: reference.AdamWScalars | reference.SGDScalars | None) -> dict:
    """The kernel arguments ``k0..k7`` for host scalars (None: a quantize kernel, no optimizer); unused slots 0."""
    values = [] if scalars is None else [getattr(scalars, name) for name in SCALAR_SLOTS[type(scalars)]]
    values += [0.0] * (N_SCALAR_SLOTS - len(values))
    return {f"k{i}": float(x) for i, x in enumerate(values)}


# ---------------------------------------------------------------- availability
def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str:
    """Why :func:`supports` says no for a CPU tensor."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    return "the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1 with backend='triton')"


def has_kernel(fmt: QuantFormat) -> bool:
    """Whether a kernel specialization exists for this format (group sizes in ``specs.GROUP_SIZES``)."""
    return triton is not None and fmt.config() in specs.format_configs()


def check_has_kernel(fmt: QuantFormat) -> None:
    if not has_kernel(fmt):
        raise ValueError(f"no kernel for {fmt}; group sizes with kernels: {specs.GROUP_SIZES}. "
                         "Use backend='reference' for this weight")


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


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Contiguous and 16-byte aligned (None counts as aligned): what 128-bit accesses need."""
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors if t is not None)


# ---------------------------------------------------------------- launching
def launch(spec, grid: tuple, **args) -> None:
    """Launch ``spec`` with exactly its signature: pointer dtypes and 16-byte alignment are checked."""
    for name, typ in spec.signature.items():
        if typ == "constexpr":
            continue
        value = args[name]
        if typ.startswith("*"):
            if "*" + specs.TRITON_DTYPES.get(value.dtype, str(value.dtype)) != typ:
                raise TypeError(f"kernel {spec.name}: {name} must be {typ}, got a {value.dtype} tensor")
            if value.data_ptr() % 16:
                raise ValueError(f"kernel {spec.name}: {name} is not 16-byte aligned; pass a fresh (cloned) tensor")
    if math.prod(grid) == 0:
        return
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        spec.fn[grid](**args, **spec.constexprs_for(_capability(device)), num_warps=spec.num_warps, **spec.options)


_CAPABILITIES: dict = {}


def _capability(device: torch.device) -> int:
    """The ``TARGET`` constexpr for a launch on ``device``: 90 for an H100, 0 on the interpreter."""
    if device.type != "cuda" or interpreter_enabled():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        major, minor = torch.cuda.get_device_capability(index)
        _CAPABILITIES[index] = 10 * major + minor
    return _CAPABILITIES[index]


_DUMMIES: dict = {}


def dummy(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor for pointer arguments a specialization never touches."""
    key = (dtype, str(device))
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(4, dtype=dtype, device=device)
    return _DUMMIES[key]


def contiguous(name: str, t: torch.Tensor, *, written: bool) -> torch.Tensor:
    if t.is_contiguous():
        return t
    if written:
        raise ValueError(f"{name} must be contiguous: the kernels update it in place")
    return t.contiguous()


def geometry(fmt: QuantFormat, shape) -> dict:
    """Rows, columns, code columns and rows per scale of a weight of ``shape`` as the step kernels tile it."""
    rows = math.prod(shape[:-1])
    rows_per_scale = shape[-2] if fmt.tensorwise else 1
    return dict(rows=rows, n_cols=shape[-1], code_cols=fmt.code_shape(shape)[-1], rows_per_scale=rows_per_scale)


# ---------------------------------------------------------------- multi-tensor tables
def _cache_put(cache: dict, key, value):
    if len(cache) > 64:
        cache.clear()
    cache[key] = value
    return value


def _stream_offsets(tensors, firsts) -> list[int]:
    """Each tensor's element offset from the first tensor of its list (one dtype per list)."""
    return [(t.data_ptr() - first.data_ptr()) // first.element_size() for t, first in zip(tensors, firsts,
                                                                                            strict=True)]


_STEP_TABLES: dict = {}
_DEVICE_TABLES: dict = {}


def groupable(fmt: QuantFormat, shape, codes, scales, grad, *others) -> bool:
    """Whether a weight may share a multi-tensor launch: small, last dim a multiple of 16 (so every
    stream's rows start 16-byte aligned), contiguous 16-byte aligned tensors of the expected sizes."""
    return (math.prod(shape) <= MULTI_TENSOR_MAX_NUMEL and len(shape) >= 2 and shape[-1] % 16 == 0
            and tuple(codes.shape) == tuple(fmt.code_shape(shape))
            and tuple(scales.shape) == tuple(fmt.scale_shape(shape)) and grad.numel() == math.prod(shape)
            and aligned(codes, scales, grad, *others))


def step_table(fmt: QuantFormat, block: int, items: list) -> tuple:
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
        geo = geometry(fmt, shape if fmt.group_size is None else (1, math.prod(shape)))
        tiles = triton.cdiv(geo["n_cols"], block)
        linear = torch.arange(geo["rows"] * tiles, dtype=torch.int64)
        program = torch.zeros(linear.numel(), eco_step.MULTI_PROGRAM_WORDS.value, dtype=torch.int64)
        program[:, eco_step.STEP_PROGRAM_TENSOR.value] = index
        program[:, eco_step.STEP_PROGRAM_ROW.value] = linear // tiles
        program[:, eco_step.STEP_PROGRAM_TILE.value] = linear % tiles
        programs.append(program)
        codes, scales, grad, exp_avg, exp_avg_sq, master = _stream_offsets(tensors, firsts)
        n_scale_groups = tensors[1].numel()
        entries.append(_record(eco_step.MULTI_TENSOR_WORDS, {
            eco_step.STEP_N_COLS: geo["n_cols"], eco_step.STEP_CODE_COLS: geo["code_cols"],
            eco_step.STEP_ROWS_PER_SCALE: geo["rows_per_scale"], eco_step.STEP_N_SCALE_GROUPS: n_scale_groups,
            eco_step.STEP_SEED: 0, eco_step.STEP_CODES: codes, eco_step.STEP_SCALES: scales,
            eco_step.STEP_WORKSPACE: workspace, eco_step.STEP_GRAD: grad, eco_step.STEP_EXP_AVG: exp_avg,
            eco_step.STEP_EXP_AVG_SQ: exp_avg_sq, eco_step.STEP_MASTER: master,
        }))
        if fmt.group_size is None:
            workspace += 2 * n_scale_groups
    program_table = torch.cat(programs).reshape(-1)
    n_programs = program_table.numel() // eco_step.MULTI_PROGRAM_WORDS.value
    words = eco_step.MULTI_TENSOR_WORDS.value
    seed_slots = [program_table.numel() + words * i + eco_step.STEP_SEED.value for i in range(len(items))]
    table = torch.cat([program_table, torch.tensor(entries, dtype=torch.int64).reshape(-1)])
    return _cache_put(_STEP_TABLES, key, (table, seed_slots, workspace, n_programs))


def _record(words, fields: dict) -> list[int]:
    """One table record: ``fields`` (word offset constexpr -> value) in order, every word given once."""
    record = [None] * words.value
    for offset, value in fields.items():
        record[offset.value] = int(value)
    assert None not in record, "a table word was left unset"
    return record


def device_table(table: torch.Tensor, seed_slots: list[int], seeds: list[int], device) -> torch.Tensor:
    """``table`` on ``device`` with the seeds written in; cached while they are all 0 (round-to-nearest)."""
    if any(seeds):
        table = table.clone()
        table[seed_slots] = torch.tensor(seeds, dtype=torch.int64)
        return table.to(device)
    key = (id(table), str(device))
    cached = _DEVICE_TABLES.get(key)
    if cached is None or cached[0] is not table:
        cached = _cache_put(_DEVICE_TABLES, key, (table, table.to(device)))
    return cached[1]


_PLAIN_TABLES: dict = {}


def plain_table(params, grads, exp_avgs, exp_avg_sqs, block: int) -> torch.Tensor:
    """The int64 launch table of :func:`eco_step.plain_multi_step_kernel` on the device, cached per set of tensors."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    key = (block, tuple((t.data_ptr(), t.numel()) for ts in lists for t in ts))
    table = _PLAIN_TABLES.get(key)
    if table is not None:
        return table
    programs, entries = [], []
    for index, p in enumerate(params):
        for start in range(0, p.numel(), block):
            programs += _record(eco_step.PLAIN_PROGRAM_WORDS, {eco_step.PLAIN_PROGRAM_TENSOR: index,
                                                                eco_step.PLAIN_PROGRAM_START: start})
        param, grad, exp_avg, exp_avg_sq = _stream_offsets([ts[index] for ts in lists], [ts[0] for ts in lists])
        entries += _record(eco_step.PLAIN_TENSOR_WORDS, {
            eco_step.PLAIN_NUMEL: p.numel(), eco_step.PLAIN_PARAM: param, eco_step.PLAIN_GRAD: grad,
            eco_step.PLAIN_EXP_AVG: exp_avg, eco_step.PLAIN_EXP_AVG_SQ: exp_avg_sq,
        })
    table = torch.tensor(programs + entries, dtype=torch.int64).to(params[0].device)
    return _cache_put(_PLAIN_TABLES, key, table)
