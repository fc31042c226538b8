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

import numpy as np
import torch

from eco import reference, rng, states
from eco.formats import QuantFormat

try:
    import triton

    from . import eco_step, moments, specs

    IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = eco_step = moments = specs = None
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
            if name in spec.aligned and value.data_ptr() % 16:
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


def geometry(fmt: QuantFormat | None, shape) -> dict:
    """Rows, columns, code columns and rows per scale of a parameter of ``shape`` as the step kernels tile it.

    ``fmt`` None: a plain parameter (a 0-d or 1-D one is one row).
    """
    shape = tuple(shape) or (1,)
    rows = math.prod(shape[:-1])
    if fmt is None:
        return dict(rows=rows, n_cols=shape[-1], code_cols=shape[-1], rows_per_scale=1)
    rows_per_scale = shape[-2] if fmt.tensorwise else 1
    return dict(rows=rows, n_cols=shape[-1], code_cols=fmt.code_shape(shape)[-1], rows_per_scale=rows_per_scale)


def matrix_rows(shape) -> int:
    """Rows of one matrix (the last two dimensions) of a parameter of ``shape``; 1 below two dimensions."""
    return shape[-2] if len(shape) >= 2 else 1


def stream_words(seed: int | None, offset: int) -> tuple[int, ...]:
    """``(stride, base)`` of the weight, m and v streams of ``seed`` at global element ``offset`` (``rng.key``),
    as unsigned 32-bit ints; zeros without a seed (nothing is rounded stochastically)."""
    if seed is None:
        return (0,) * 6
    words = []
    for stream_seed in rng.stream_seeds(seed):
        key = rng.key(stream_seed, offset)
        words += [int(key.stride) & 0xFFFFFFFF, int(key.base) & 0xFFFFFFFF]
    return tuple(words)


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


def _tables_key(*parts, items) -> tuple:
    return (*parts, tuple((tuple(shape), *((t.data_ptr(), t.dtype) for t in ts)) for shape, *ts in items))


_STEP_TABLES: dict = {}
_DEVICE_TABLES: dict = {}

#: the pointer arguments of a multi-tensor step, in the order of an item's tensors (see :func:`step_table`)
STEP_POINTERS = ("codes_ptr", "scales_ptr", "grad_ptr", "exp_avg_ptr", "exp_avg_scale_ptr", "exp_avg_sq_ptr",
                 "exp_avg_sq_scale_ptr", "v_row_ptr", "v_col_ptr", "v_mean_ptr", "master_ptr")


def groupable(fmt: QuantFormat | None, shape, streams, block_aligned: bool) -> bool:
    """Whether a tensor may share a multi-tensor launch: small, last dim (a plain tensor's numel when it is
    below two dimensions) a multiple of 16 (of ``STATE_BLOCK`` when ``block_aligned``: 8-bit or factored
    states of a flat-tiled tensor), and contiguous 16-byte aligned ``streams``."""
    numel = math.prod(shape)
    flat = fmt is None or fmt.group_size is not None
    last = shape[-1] if len(shape) >= 2 else numel
    if numel > MULTI_TENSOR_MAX_NUMEL or last % 16 or numel == 0 or (fmt is not None and len(shape) < 2):
        return False
    if block_aligned and flat and len(shape) >= 2 and last % states.STATE_BLOCK:
        return False
    return aligned(*streams)


def step_table(fmt: QuantFormat | None, block: int, items: list, gmax_sizes: list[int]) -> tuple:
    """The int64 table of :func:`eco_step.eco_multi_step_kernel` (stream keys 0) on the host, cached per set of
    tensors.

    ``items`` are ``(shape, *tensors)`` with the tensors in :data:`STEP_POINTERS` order (unused ones: the
    same dummy for every item); ``gmax_sizes``: each tensor's words of the max |g| workspace (its matrices
    with a factored second moment, else 0). Returns ``(table, stream slots, workspace int32 elements,
    programs)``: the stream slots are the table words of each tensor's six stream keys.
    """
    key = _tables_key(fmt, block, tuple(gmax_sizes), items=items)
    cached = _STEP_TABLES.get(key)
    if cached is not None:
        return cached
    programs, entries, stream_slots, workspace, gmax = [], [], [], 0, 0
    firsts = items[0][1:]
    flat = fmt is None or fmt.group_size is not None
    for index, (shape, *tensors) in enumerate(items):
        # Block/group formats and plain parameters: the tensor as one row of numel elements (its groups and state
        # blocks never straddle rows, and the random numbers of element i are its own), so that narrow matrices
        # fill whole tiles. Row/tensor scales need real rows.
        geo = geometry(fmt, (1, math.prod(shape)) if flat else shape)
        tiles = triton.cdiv(geo["n_cols"], block)
        linear = torch.arange(geo["rows"] * tiles, dtype=torch.int64)
        program = torch.zeros(linear.numel(), eco_step.MULTI_PROGRAM_WORDS.value, dtype=torch.int64)
        program[:, eco_step.STEP_PROGRAM_TENSOR.value] = index
        program[:, eco_step.STEP_PROGRAM_ROW.value] = linear // tiles
        program[:, eco_step.STEP_PROGRAM_TILE.value] = linear % tiles
        programs.append(program)
        offsets = dict(zip(STEP_POINTERS, _stream_offsets(tensors, firsts), strict=True))
        n_scale_groups = tensors[1].numel() if fmt is not None else 0
        fields = {
            eco_step.STEP_N_COLS: geo["n_cols"], eco_step.STEP_CODE_COLS: geo["code_cols"],
            eco_step.STEP_ROWS_PER_SCALE: geo["rows_per_scale"], eco_step.STEP_N_SCALE_GROUPS: n_scale_groups,
            eco_step.STEP_MATRIX_ROWS: matrix_rows(shape), eco_step.STEP_ROW_LENGTH: shape[-1] if shape else 1,
            eco_step.STEP_WORKSPACE: workspace, eco_step.STEP_GMAX: gmax,
        }
        fields.update({word: 0 for word in eco_step.STEP_STREAM_WORDS})
        for word, name in ((eco_step.STEP_CODES, "codes_ptr"), (eco_step.STEP_SCALES, "scales_ptr"),
                           (eco_step.STEP_GRAD, "grad_ptr"), (eco_step.STEP_EXP_AVG, "exp_avg_ptr"),
                           (eco_step.STEP_EXP_AVG_SCALE, "exp_avg_scale_ptr"),
                           (eco_step.STEP_EXP_AVG_SQ, "exp_avg_sq_ptr"),
                           (eco_step.STEP_EXP_AVG_SQ_SCALE, "exp_avg_sq_scale_ptr"),
                           (eco_step.STEP_V_ROW, "v_row_ptr"), (eco_step.STEP_V_COL, "v_col_ptr"),
                           (eco_step.STEP_V_MEAN, "v_mean_ptr"), (eco_step.STEP_MASTER, "master_ptr")):
            fields[word] = offsets[name]
        entries.append(_record(eco_step.MULTI_TENSOR_WORDS, fields))
        if fmt is not None and fmt.group_size is None:
            workspace += 2 * n_scale_groups
        gmax += gmax_sizes[index]
    program_table = torch.cat(programs).reshape(-1)
    n_programs = program_table.numel() // eco_step.MULTI_PROGRAM_WORDS.value
    words = eco_step.MULTI_TENSOR_WORDS.value
    stream_slots = [[program_table.numel() + words * i + w.value for w in eco_step.STEP_STREAM_WORDS]
                    for i in range(len(items))]
    table = torch.cat([program_table, torch.tensor(entries, dtype=torch.int64).reshape(-1)])
    return _cache_put(_STEP_TABLES, key, (table, stream_slots, workspace, n_programs))


def _record(words, fields: dict) -> list[int]:
    """One table record: ``fields`` (word offset constexpr -> value) in order, every word given once."""
    record = [None] * words.value
    for offset, value in fields.items():
        record[offset.value] = int(value)
    assert None not in record, "a table word was left unset"
    return record


def device_table(table: torch.Tensor, stream_slots: list[list[int]], keys: list[tuple], device) -> torch.Tensor:
    """``table`` on ``device`` with each tensor's stream keys written in; cached while they are all 0 (nothing is
    rounded stochastically)."""
    if any(any(k) for k in keys):
        table = table.clone()
        for slots, words in zip(stream_slots, keys, strict=True):
            table[slots] = torch.tensor([words[i] for i in range(len(slots))], dtype=torch.int64)
        return table.to(device)
    key = (id(table), str(device))
    cached = _DEVICE_TABLES.get(key)
    if cached is None or cached[0] is not table:
        cached = _cache_put(_DEVICE_TABLES, key, (table, table.to(device)))
    return cached[1]


_PLAIN_TABLES: dict = {}


def plain_table(params, grads, exp_avgs, exp_avg_sqs, block: int) -> tuple:
    """The int64 launch table of :func:`eco_step.plain_multi_step_kernel` on the host (stream keys 0), cached per
    set of tensors. Returns ``(table, stream slots)`` (the words of each tensor's m and v keys)."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    key = (block, tuple((t.data_ptr(), t.numel()) for ts in lists for t in ts))
    cached = _PLAIN_TABLES.get(key)
    if cached is not None:
        return cached
    programs, entries = [], []
    for index, p in enumerate(params):
        for start in range(0, p.numel(), block):
            programs += _record(eco_step.PLAIN_PROGRAM_WORDS, {eco_step.PLAIN_PROGRAM_TENSOR: index,
                                                                eco_step.PLAIN_PROGRAM_START: start})
        param, grad, exp_avg, exp_avg_sq = _stream_offsets([ts[index] for ts in lists], [ts[0] for ts in lists])
        fields = {eco_step.PLAIN_NUMEL: p.numel(), eco_step.PLAIN_PARAM: param, eco_step.PLAIN_GRAD: grad,
                  eco_step.PLAIN_EXP_AVG: exp_avg, eco_step.PLAIN_EXP_AVG_SQ: exp_avg_sq}
        fields.update({word: 0 for word in eco_step.PLAIN_STREAM_WORDS})
        entries += _record(eco_step.PLAIN_TENSOR_WORDS, fields)
    words = eco_step.PLAIN_TENSOR_WORDS.value
    stream_slots = [[len(programs) + words * i + w.value for w in eco_step.PLAIN_STREAM_WORDS]
                    for i in range(len(params))]
    return _cache_put(_PLAIN_TABLES, key, (torch.tensor(programs + entries, dtype=torch.int64), stream_slots))


# ---------------------------------------------------------------- factored second moments
_FACTORED_TABLES: dict = {}


def factored_tables(items: list) -> tuple:
    """The int64 tables of ``moments.factored_stats_kernel`` and ``moments.factored_finalize_kernel`` on the host
    (v-stream keys 0), cached per set of tensors, and the workspace layout.

    ``items`` are ``(shape, full_shape, grad, row, col, mean)`` of the tensors with a factored second moment
    (``full_shape``: the unsharded tensor's; a dim-0 shard's ``shape`` has fewer rows). Returns
    ``(stats table, finalize table, stream slots (per table), stats programs, finalize programs, workspace
    sizes (gmax, row sums, column sums, totals), per-tensor workspace offsets, rows aligned)``; rows aligned:
    every row is a multiple of 16 elements and every gradient 16 bytes times a whole number from the first
    (the statistics kernel's ``ALIGNED`` variant).
    """
    key = _tables_key("factored", items=[(s, g, r, c, m) for s, _, g, r, c, m in items]) + (
        tuple(tuple(f) for _, f, *_ in items),)
    cached = _FACTORED_TABLES.get(key)
    if cached is not None:
        return cached
    tile_rows, tile_cols = specs.STATS_TILE
    rows_per_program = tile_rows * specs.STATS_ROW_TILES
    firsts = items[0][2:]
    stats_programs, final_programs, entries, layout = [], [], [], []
    sizes = [0, 0, 0, 0]
    rows_aligned = True
    for index, (shape, full_shape, *tensors) in enumerate(items):
        lay = reference.layout(shape)
        n_mats = math.prod(shape[:-2])
        full_rows = reference.layout(full_shape).matrix_rows
        grad, row, col, mean = _stream_offsets(tensors, firsts)
        rows_aligned &= lay.cols % 16 == 0 and (grad * tensors[0].element_size()) % 16 == 0
        offsets = tuple(sizes)
        layout.append(offsets)
        for m in range(n_mats):
            for r in range(m * lay.matrix_rows, (m + 1) * lay.matrix_rows, rows_per_program):
                for c in range(0, lay.cols, tile_cols):
                    stats_programs += [index, r, c]
        for part, count in ((moments.FINAL_ROWS, lay.rows), (moments.FINAL_COLS, n_mats * lay.cols),
                            (moments.FINAL_MEANS, n_mats)):
            for start in range(0, count, specs.FINALIZE_BLOCK):
                final_programs += [index, part.value, start]
        entries += _record(moments.FACT_TENSOR_WORDS, {
            moments.FACT_ROWS: lay.rows, moments.FACT_COLS: lay.cols, moments.FACT_MATRIX_ROWS: lay.matrix_rows,
            moments.FACT_MATRICES: n_mats, moments.FACT_BITS: reference.fixed_point_bits(full_rows, lay.cols),
            moments.FACT_V_STRIDE: 0, moments.FACT_V_BASE: 0, moments.FACT_GRAD: grad,
            moments.FACT_GMAX: offsets[0], moments.FACT_ROW_SUM: offsets[1], moments.FACT_COL_SUM: offsets[2],
            moments.FACT_TOTAL: offsets[3], moments.FACT_ROW: row, moments.FACT_COL: col, moments.FACT_MEAN: mean,
            moments.FACT_COUNT_COLS: _f32_bits(lay.cols), moments.FACT_COUNT_ROWS: _f32_bits(full_rows),
            moments.FACT_COUNT_ALL: _f32_bits(full_rows * lay.cols),
        })
        for i, n in enumerate((n_mats, lay.rows, n_mats * lay.cols, n_mats)):
            sizes[i] += n
    words = moments.FACT_TENSOR_WORDS.value
    tables, slots = [], []
    for programs in (stats_programs, final_programs):
        tables.append(torch.tensor(programs + entries, dtype=torch.int64))
        slots.append([[len(programs) + words * i + w.value for w in (moments.FACT_V_STRIDE, moments.FACT_V_BASE)]
                      for i in range(len(items))])
    n_stats = len(stats_programs) // moments.STATS_PROGRAM_WORDS.value
    n_final = len(final_programs) // moments.FINAL_PROGRAM_WORDS.value
    return _cache_put(_FACTORED_TABLES, key, (*tables, slots, n_stats, n_final, tuple(sizes), layout, rows_aligned))


def _f32_bits(count: int) -> int:
    """The fp32 bits of ``count`` rounded to fp32 on the host (as ``reference._finalize_factored_`` divides by)."""
    return int(np.array(count, dtype=np.float32).view(np.int32))
