"""Triton code for the random stream and the optimizer-state formats (``eco.rng``, ``eco.states``).

Every helper mirrors its torch counterpart expression for expression (fp32,
one rounding per line, IEEE division and square root), so that a kernel
stores the bits the reference stores:

- :func:`stream_hash` is ``eco.rng``'s lowbias32 of ``index * stride + base``
  in uint32 arithmetic (``index``: the element's flat index in the tensor or
  shard the launch covers; ``stride``/``base``: ``rng.key`` of the stream at
  that tensor's first element, computed on the host);
- :func:`load_state` / :func:`store_state` read and write one state (m or v)
  of a tile in its format: fp32, bf16 (stochastic rounding on the bits),
  int8 or E4M3 codes with one absmax scale per ``STATE_BLOCK`` elements of a
  row (the tile is ``[NB, NG, W]``, ``NB`` whole blocks), or E4M3 codes of
  ``sqrt(v)`` (rounding unbiased in v);
- the factored second moment: :func:`factored_stats_kernel` (the exact
  fixed-point row/column/total sums of g*g) and
  :func:`factored_finalize_kernel` (the row/column/mean EMAs from them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from eco import formats, reference, states

from . import e4m3

# State formats (the M_FMT / V_FMT constexprs).
STATE_FP32 = tl.constexpr(0)
STATE_BF16 = tl.constexpr(1)
STATE_INT8 = tl.constexpr(2)
STATE_FP8 = tl.constexpr(3)  # m: E4M3 codes of m; v: E4M3 codes of sqrt(v)
STATE_FACTORED = tl.constexpr(4)  # v only

STATE_BLOCK = tl.constexpr(states.STATE_BLOCK)
INT8_RHO = tl.constexpr(states.INT8_MAX)
FP8_RHO = tl.constexpr(formats.FP8_MAX)
ZERO_GROUP_ABSMAX = tl.constexpr(formats.ZERO_GROUP_ABSMAX)
FP8_MIN_POSITIVE = tl.constexpr(2.0**-9)
BF16_MAX_MAGNITUDE_BITS = tl.constexpr(states.BF16_MAX_BITS | 0xFFFF)
SATURATION = tl.constexpr(reference.SATURATION)
# lowbias32's multipliers (eco.rng)
HASH_MUL1 = tl.constexpr(0x7FEB352D)
HASH_MUL2 = tl.constexpr(0x846CA68B)

# Word offsets of the factored-v launch tables (built by ``eco.kernels.launcher.factored_tables``).
STATS_PROGRAM_TENSOR, STATS_PROGRAM_ROW, STATS_PROGRAM_COL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
STATS_PROGRAM_WORDS = tl.constexpr(3)
FINAL_PROGRAM_TENSOR, FINAL_PROGRAM_PART, FINAL_PROGRAM_START = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FINAL_PROGRAM_WORDS = tl.constexpr(3)
FINAL_ROWS, FINAL_COLS, FINAL_MEANS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # FINAL_PROGRAM_PART
(FACT_ROWS, FACT_COLS, FACT_MATRIX_ROWS, FACT_MATRICES, FACT_BITS, FACT_V_STRIDE, FACT_V_BASE, FACT_GRAD,
 FACT_GMAX, FACT_ROW_SUM, FACT_COL_SUM, FACT_TOTAL, FACT_ROW, FACT_COL, FACT_MEAN, FACT_COUNT_COLS, FACT_COUNT_ROWS,
 FACT_COUNT_ALL) = (tl.constexpr(i) for i in range(18))
FACT_TENSOR_WORDS = tl.constexpr(18)


# ---------------------------------------------------------------- the random stream
@triton.jit
def stream_hash(index, stride, base):
    """``eco.rng``'s hash of element ``index``: lowbias32 of ``index * stride + base`` (uint32 arithmetic).

    ``index`` is any integer (its low 32 bits count); ``stride`` and ``base``
    hold ``rng.key``'s words as integers in [0, 2**32).
    """
    x = index.to(tl.uint32) * stride.to(tl.uint32) + base.to(tl.uint32)
    x ^= x >> 16
    x *= HASH_MUL1
    x ^= x >> 15
    x *= HASH_MUL2
    return x ^ (x >> 16)


@triton.jit
def uniform_of(h):
    """``rng.uniform``: the top 24 bits of the hash as an fp32 in [0, 1)."""
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


# ---------------------------------------------------------------- block scales
@triton.jit
def block_scale_pair(absmax, RHO: tl.constexpr):
    """``absmax / rho`` and ``rho / absmax`` (IEEE divisions); ``(1, 0)`` for a (near-)zero block or group."""
    live = absmax > ZERO_GROUP_ABSMAX
    safe = tl.where(live, absmax, 1.0)
    scale = tl.where(live, tl.math.div_rn(safe, RHO + tl.zeros_like(safe)), 1.0)
    inv_scale = tl.where(live, tl.math.div_rn(RHO + tl.zeros_like(safe), safe), 0.0)
    return scale, inv_scale


@triton.jit
def block_absmax(x):
    """Absmax of each ``STATE_BLOCK`` of an ``[NB, NG, W]`` tile, as ``[NB, 1, 1]`` (masked lanes must hold 0)."""
    return tl.max(tl.max(tl.abs(x), axis=2), axis=1)[:, None, None]


# ---------------------------------------------------------------- bf16
@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even on the bits (the interpreter's cast truncates)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_rne(ptr, offsets, value, mask, TARGET: tl.constexpr):
    """Store fp32 ``value`` as ``ptr``'s dtype (fp32 or bf16), rounded to nearest even like ``Tensor.copy_``.

    Compiled (``TARGET > 0``) the hardware conversion rounds to nearest even;
    the interpreter's cast truncates, so there it is done on the bits.
    """
    if ptr.dtype.element_ty == tl.bfloat16 and TARGET == 0:
        tl.store(ptr + offsets, to_bf16_rne(value), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def to_bf16_stochastic(x, h):
    """``states.round_bf16_stochastic`` with the hash's top 16 bits: add them below the kept 16, truncate.

    On the magnitude, so either sign is unbiased; saturates at the largest
    finite bf16. Returns the bf16 value (exact: the low 16 bits are zero).
    """
    bits = x.to(tl.int32, bitcast=True)
    magnitude = tl.minimum((bits & 0x7FFFFFFF) + (h >> 16).to(tl.int32), BF16_MAX_MAGNITUDE_BITS)
    rounded = (magnitude >> 16) | ((bits >> 16) & -0x8000)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


# ---------------------------------------------------------------- one state of a tile
@triton.jit
def load_state(ptr, scale_ptr, offsets, state_block, mask, block_mask, FMT: tl.constexpr, SQUARED: tl.constexpr,
               TARGET: tl.constexpr):
    """fp32 values of a dense or 8-bit state at ``offsets`` (``state_block``: each element's block index).

    ``SQUARED``: the codes hold sqrt(v) (an 8-bit second moment).
    """
    if FMT == STATE_FP32 or FMT == STATE_BF16:
        values = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        scale = tl.load(scale_ptr + state_block, mask=block_mask, other=1.0)
        if FMT == STATE_INT8:
            values = tl.load(ptr + offsets, mask=mask, other=0).to(tl.float32) * scale
        else:
            byte = tl.load(ptr + offsets, mask=mask, other=0)
            if TARGET >= 89:
                grid = e4m3.decode_native(byte)
            else:
                grid = e4m3.decode(byte)
            values = grid * scale
        if SQUARED:
            values = values * values
    return values


@triton.jit
def store_state(ptr, scale_ptr, offsets, state_block, mask, block_mask, x, index, stride, base,
                FMT: tl.constexpr, SQUARED: tl.constexpr, TARGET: tl.constexpr):
    """Store fp32 ``x`` (``|x| <= 2**126``) into a dense or 8-bit state, as ``StateFormat.store_`` does.

    Below fp32 it rounds stochastically with the state's stream (element
    ``index``; ``stride``, ``base``: the stream's key). 8-bit formats take the
    absmax of each block over the new values (``x`` must be 0 on masked
    lanes) and store the block's scale where ``block_mask`` holds.
    ``SQUARED``: store E4M3 codes of sqrt(x) (a second moment).
    """
    if FMT == STATE_FP32:
        tl.store(ptr + offsets, x, mask=mask)
    elif FMT == STATE_BF16:
        tl.store(ptr + offsets, to_bf16_stochastic(x, stream_hash(index, stride, base)), mask=mask)
    else:
        h = stream_hash(index, stride, base)
        if SQUARED:
            x = tl.math.sqrt_rn(x)
        if FMT == STATE_INT8:
            scale, inv_scale = block_scale_pair(block_absmax(x), INT8_RHO)
            y = tl.minimum(tl.maximum(x * inv_scale, -INT8_RHO), INT8_RHO)
            lower = tl.floor(y)
            grid = tl.where(uniform_of(h) < y - lower, lower + 1.0, lower)
            tl.store(ptr + offsets, grid.to(tl.int8), mask=mask)
        else:
            scale, inv_scale = block_scale_pair(block_absmax(x), FP8_RHO)
            y = tl.minimum(tl.maximum(x * inv_scale, -FP8_RHO), FP8_RHO)
            if SQUARED:
                grid = round_square_stochastic(y, uniform_of(h), x > 0.0)
            else:
                grid = e4m3.round_stochastic(y, ~h)
            if TARGET >= 89:
                code = e4m3.encode_native(grid)
            else:
                code = e4m3.encode_nearest(grid)
            tl.store(ptr + offsets, code.to(tl.uint8), mask=mask)
        tl.store(scale_ptr + state_block, scale, mask=block_mask)


@triton.jit
def round_square_stochastic(y, u, positive):
    """``states._round_square_stochastic``: the E4M3 grid value of ``y >= 0`` rounded so that E[grid**2] = y**2.

    Between the neighbours ``lo <= y <= hi`` (spacing ``2**(max(e, -6) - 3)``
    in the binade of ``y``), up when ``u * (hi*hi - lo*lo) < y*y - lo*lo``; a
    ``positive`` value that would round to 0 stores the smallest positive code.
    """
    binade = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    ulp = ((binade + (127 - 3)) << 23).to(tl.float32, bitcast=True)
    units_per_ulp = ((3 - binade + 127) << 23).to(tl.float32, bitcast=True)  # 1 / ulp, exact
    lo = tl.floor(y * units_per_ulp) * ulp
    hi = tl.minimum(lo + ulp, FP8_RHO)
    up = u * (hi * hi - lo * lo) < y * y - lo * lo
    grid = tl.where(up, hi, lo)
    return tl.where(positive & (grid == 0.0), FP8_MIN_POSITIVE, grid)


# ---------------------------------------------------------------- factored second moment
@triton.jit
def fixed_point_exponent(gmax_bits):
    """``reference.fixed_point_scales``' exponent ``e + 1`` of ``max |g|`` (given as its fp32 bits), in [-63, 64]."""
    return tl.minimum(tl.maximum(((gmax_bits >> 23) & 0xFF) - 127, -64), 63) + 1


@triton.jit
def factored_stats_kernel(grad_ptr, gmax_ptr, row_sum_ptr, col_sum_ptr, total_ptr, table_ptr,
                          ROWS: tl.constexpr, COLS: tl.constexpr, ROW_TILES: tl.constexpr, ALIGNED: tl.constexpr,
                          TARGET: tl.constexpr):
    """The exact fixed-point sums of a factored second moment, for many tensors in one launch.

    For every element: ``q = floor(((g * 2**-E) * (g * 2**-E)) * 2**F + u)``
    as int64 (``E`` from the matrix's ``max |g|``, ``u`` the element's uniform
    in the v stream); adds ``q`` into its row's, its column's and its matrix's
    int64 sums (atomics: any order gives the same integers). A program covers
    ``ROW_TILES`` tiles of ``[ROWS, COLS]`` of one matrix, summing the columns
    in registers first. ``table_ptr`` (int64) holds per program ``[tensor,
    first row, first column]``, then per tensor the words ``FACT_*``
    (``grad``, ``gmax``, the sums: element offsets from the pointers).
    ``ALIGNED``: every tensor's rows are a multiple of 16 elements and its
    gradient starts 16 bytes after ``grad_ptr`` times a whole number (the
    launcher checks it), so the hints below make the gradient loads 128-bit;
    otherwise they are as wide as one element.
    """
    pid = tl.program_id(0)
    program = table_ptr + STATS_PROGRAM_WORDS * pid
    tensor = tl.load(program + STATS_PROGRAM_TENSOR)
    first_row = tl.load(program + STATS_PROGRAM_ROW)
    first_col = tl.load(program + STATS_PROGRAM_COL)
    entry = table_ptr + STATS_PROGRAM_WORDS * tl.num_programs(0) + FACT_TENSOR_WORDS * tensor
    rows = tl.load(entry + FACT_ROWS)
    n_cols = tl.load(entry + FACT_COLS)
    matrix_rows = tl.load(entry + FACT_MATRIX_ROWS)
    bits = tl.load(entry + FACT_BITS).to(tl.int32)
    stride = tl.load(entry + FACT_V_STRIDE)
    base = tl.load(entry + FACT_V_BASE)
    grad_offset = tl.load(entry + FACT_GRAD)
    if ALIGNED:
        n_cols = tl.multiple_of(n_cols, 16)
        first_col = tl.multiple_of(first_col, COLS)
        grad_offset = tl.multiple_of(grad_offset, 128 // grad_ptr.dtype.element_ty.primitive_bitwidth)
    grad = grad_ptr + grad_offset
    matrix = first_row // matrix_rows  # a program's rows never straddle matrices
    exponent = fixed_point_exponent(tl.load(gmax_ptr + tl.load(entry + FACT_GMAX) + matrix))
    down = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    fixed_one = ((bits + 127) << 23).to(tl.float32, bitcast=True)  # 2**F
    last_row = tl.minimum(first_row + ROWS * ROW_TILES, (matrix + 1) * matrix_rows)
    last_row = tl.minimum(last_row, rows)
    col = first_col + tl.arange(0, COLS)[None, :]
    col_mask = col < n_cols
    col_sum = tl.zeros([COLS], dtype=tl.int64)
    total = tl.zeros([ROWS], dtype=tl.int64)
    for r in range(0, ROW_TILES):
        row = first_row + r * ROWS + tl.arange(0, ROWS)[:, None]
        row_mask = row < last_row
        mask = row_mask & col_mask
        index = row * n_cols + col
        y = tl.load(grad + index, mask=mask, other=0.0).to(tl.float32) * down
        u = uniform_of(stream_hash(index, stride, base))
        q = tl.where(mask, tl.floor((y * y) * fixed_one + u).to(tl.int64), 0)
        row_q = tl.sum(q, axis=1)
        tl.atomic_add(row_sum_ptr + tl.load(entry + FACT_ROW_SUM) + row.reshape(ROWS), row_q,
                      mask=row_mask.reshape(ROWS), sem="relaxed")
        col_sum += tl.sum(q, axis=0)
        total += row_q
    tl.atomic_add(col_sum_ptr + tl.load(entry + FACT_COL_SUM) + matrix * n_cols + col.reshape(COLS), col_sum,
                  mask=col_mask.reshape(COLS), sem="relaxed")
    tl.atomic_add(total_ptr + tl.load(entry + FACT_TOTAL) + matrix, tl.sum(total, axis=0), sem="relaxed")


@triton.jit
def mean_of_sum(q, bits, count, up):
    """``reference._finalize_factored_``'s ``mean_of``: ``((float(q) * 2**-F) / count) * up * up``."""
    unit = ((127 - bits) << 23).to(tl.float32, bitcast=True)  # 2**-F
    return tl.math.div_rn(q.to(tl.float32) * unit, count) * up * up


@triton.jit
def factored_finalize_kernel(gmax_ptr, row_sum_ptr, col_sum_ptr, total_ptr, row_ptr, col_ptr, mean_ptr, table_ptr,
                             beta2, one_minus_beta2, BLOCK: tl.constexpr, TARGET: tl.constexpr):
    """``row``, ``col``, ``mean`` <- ``beta2 * old + (1 - beta2) * mean of g*g`` from the int64 sums.

    A program updates ``BLOCK`` entries of one part (``FINAL_ROWS``,
    ``FINAL_COLS`` or ``FINAL_MEANS``) of one tensor; ``table_ptr`` (int64)
    holds per program ``[tensor, part, first entry]``, then per tensor the
    words ``FACT_*`` (the counts are the fp32 bits of the host-rounded counts).
    """
    pid = tl.program_id(0)
    program = table_ptr + FINAL_PROGRAM_WORDS * pid
    tensor = tl.load(program + FINAL_PROGRAM_TENSOR)
    part = tl.load(program + FINAL_PROGRAM_PART)
    start = tl.load(program + FINAL_PROGRAM_START)
    entry = table_ptr + FINAL_PROGRAM_WORDS * tl.num_programs(0) + FACT_TENSOR_WORDS * tensor
    n_cols = tl.load(entry + FACT_COLS)
    matrix_rows = tl.load(entry + FACT_MATRIX_ROWS)
    bits = tl.load(entry + FACT_BITS).to(tl.int32)
    gmax = gmax_ptr + tl.load(entry + FACT_GMAX)
    index = start + tl.arange(0, BLOCK)
    if part == FINAL_ROWS:
        n = tl.load(entry + FACT_ROWS)
        matrix = index // matrix_rows
        q_ptr = row_sum_ptr + tl.load(entry + FACT_ROW_SUM)
        state_ptr = row_ptr + tl.load(entry + FACT_ROW)
        count = tl.load(entry + FACT_COUNT_COLS).to(tl.int32).to(tl.float32, bitcast=True)
    elif part == FINAL_COLS:
        n = tl.load(entry + FACT_MATRICES) * n_cols
        matrix = index // n_cols
        q_ptr = col_sum_ptr + tl.load(entry + FACT_COL_SUM)
        state_ptr = col_ptr + tl.load(entry + FACT_COL)
        count = tl.load(entry + FACT_COUNT_ROWS).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        n = tl.load(entry + FACT_MATRICES)
        matrix = index
        q_ptr = total_ptr + tl.load(entry + FACT_TOTAL)
        state_ptr = mean_ptr + tl.load(entry + FACT_MEAN)
        count = tl.load(entry + FACT_COUNT_ALL).to(tl.int32).to(tl.float32, bitcast=True)
    mask = index < n
    exponent = fixed_point_exponent(tl.load(gmax + matrix, mask=mask, other=0))
    up = ((127 + exponent) << 23).to(tl.float32, bitcast=True)
    new = mean_of_sum(tl.load(q_ptr + index, mask=mask, other=0), bits, count, up)
    old = tl.load(state_ptr + index, mask=mask, other=0.0)
    tl.store(state_ptr + index, beta2 * old + one_minus_beta2 * new, mask=mask)
