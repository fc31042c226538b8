"""The Triton kernels of the ECO step (launched by ``eco.kernels.steps``; bytes moved: ``eco.kernels.traffic``).

Every expression mirrors ``eco/reference.py`` in the same order, in fp32, with
host scalars passed as fp32, IEEE division (``div_rn``) and square root
(``sqrt_rn``) where the reference divides or takes a root, the reference's
saturations at 2**126, and no FMA contraction (launched with
``enable_fp_fusion=False``). That is what makes every stored bit identical to
the reference, for round-to-nearest and for stochastic rounding alike: the
random numbers are ``eco.rng``'s counter-based stream, evaluated per element
(``moments.stream_hash``).

``TARGET`` (a constexpr: the compute capability compiled for, 0 under the
interpreter; see ``specs.KernelSpec.constexprs_for``) picks the conversions:
bf16 parameter stores use the hardware's round-to-nearest-even when compiled,
and sm_89+ encodes/decodes E4M3 with its conversion instructions; sm_80 and
the interpreter use the bit codec of ``e4m3``.

Tiles: a program owns ``BLOCK`` logical elements of one row (grid = rows x
column tiles), viewed as ``[NB, NG, W]``: ``NB`` blocks of ``STATE_BLOCK``
(128) elements (the blocks of the 8-bit state formats), each ``NG`` groups of
``W`` (the weight's group size, or 128), so that group absmaxes reduce along
axis 2 and state-block absmaxes along axes 1 and 2, in registers. Row-wise FP8
and tensor-wise INT4 (``GROUP_SIZE == 0``) take two launches of the same
kernel: ``PASS == 0`` computes ``w~`` and atomically maxes ``|w~|`` (as int32
bits of a non-negative float, which order like the floats) into a workspace,
and saves the old scale; ``PASS == 1`` recomputes the identical ``w~`` from
the unchanged inputs, quantizes with the finished absmax and stores. INT4
tiles hold elements like FP8 ones (so grad, m, v are read with contiguous
vector loads); the code bytes (even element in the low nibble, odd in the
high) are loaded contiguously and unpacked with ``tl.join``, and packed back
with ``tl.split`` before the store. ``WEIGHT == WEIGHT_PLAIN`` is an
unquantized parameter (``codes_ptr`` is the parameter): the plain step on the
same tiles, for the state formats the flat plain kernels do not store.

A factored second moment (``V_FMT == STATE_FACTORED``) reads ``v`` as
``row[i] * (col[j] / mean)`` and atomically maxes ``|g|`` per matrix into
``gmax_ptr`` (in the first pass); ``moments.factored_stats_kernel`` and
``moments.factored_finalize_kernel`` then update row, col and mean.

The tile logic is :func:`eco_tile`, once: ``eco_step_kernel`` runs it for one
tensor (grid rows x tiles), ``eco_multi_step_kernel`` for many (a table gives
each program its tensor, row and tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from eco import formats

from . import e4m3
from .moments import (
    FP8_RHO,
    SATURATION,
    STATE_BLOCK,
    STATE_FACTORED,
    block_scale_pair,
    load_state,
    store_rne,
    store_state,
    stream_hash,
    uniform_of,
)

INT4_RHO = tl.constexpr(formats.INT4.rho)

# The OPT constexpr: which update a kernel applies.
OPT_ADAMW = tl.constexpr(0)
OPT_SGD = tl.constexpr(1)
OPT_QUANTIZE = tl.constexpr(2)  # no optimizer: w~ is the input tensor (quantize kernels)

# The WEIGHT constexpr: how the parameter is stored.
WEIGHT_FP8 = tl.constexpr(0)
WEIGHT_INT4 = tl.constexpr(1)
WEIGHT_PLAIN = tl.constexpr(2)  # unquantized: ``codes_ptr`` is the fp32/bf16 parameter

# Word offsets in the int64 launch tables of the multi-tensor kernels (built by ``eco.kernels.launcher``):
# one record per program, then one per tensor, each tensor's pointer offsets in elements of that pointer's dtype.
STEP_PROGRAM_TENSOR, STEP_PROGRAM_ROW, STEP_PROGRAM_TILE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MULTI_PROGRAM_WORDS = tl.constexpr(3)
(STEP_N_COLS, STEP_CODE_COLS, STEP_ROWS_PER_SCALE, STEP_N_SCALE_GROUPS, STEP_MATRIX_ROWS, STEP_ROW_LENGTH,
 STEP_W_STRIDE, STEP_W_BASE, STEP_M_STRIDE, STEP_M_BASE, STEP_V_STRIDE, STEP_V_BASE,
 STEP_CODES, STEP_SCALES, STEP_WORKSPACE, STEP_GMAX, STEP_GRAD, STEP_EXP_AVG, STEP_EXP_AVG_SCALE, STEP_EXP_AVG_SQ,
 STEP_EXP_AVG_SQ_SCALE, STEP_V_ROW, STEP_V_COL, STEP_V_MEAN, STEP_MASTER) = (tl.constexpr(i) for i in range(25))
MULTI_TENSOR_WORDS = tl.constexpr(25)
#: the words a step's seeds fill (``launcher.stream_words``), in order
STEP_STREAM_WORDS = (STEP_W_STRIDE, STEP_W_BASE, STEP_M_STRIDE, STEP_M_BASE, STEP_V_STRIDE, STEP_V_BASE)
PLAIN_PROGRAM_TENSOR, PLAIN_PROGRAM_START = tl.constexpr(0), tl.constexpr(1)
PLAIN_PROGRAM_WORDS = tl.constexpr(2)
(PLAIN_NUMEL, PLAIN_M_STRIDE, PLAIN_M_BASE, PLAIN_V_STRIDE, PLAIN_V_BASE, PLAIN_PARAM, PLAIN_GRAD, PLAIN_EXP_AVG,
 PLAIN_EXP_AVG_SQ) = (tl.constexpr(i) for i in range(9))
PLAIN_TENSOR_WORDS = tl.constexpr(9)
PLAIN_STREAM_WORDS = (PLAIN_M_STRIDE, PLAIN_M_BASE, PLAIN_V_STRIDE, PLAIN_V_BASE)


@triton.jit
def saturate(x):
    """``reference._saturate``: clamp to ``[-2**126, 2**126]`` (an infinity saturates)."""
    return tl.minimum(tl.maximum(x, -SATURATION), SATURATION)


@triton.jit
def adamw_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2, eps):
    """``reference._adam_moments``: returns ``m~, v', d``."""
    m_new = beta1 * m + one_minus_beta1 * g
    v_new = tl.minimum(beta2 * v + one_minus_beta2 * (g * g), SATURATION)
    d = tl.math.sqrt_rn(tl.minimum(v_new * inv_bc2, SATURATION)) + eps
    return m_new, v_new, d


@triton.jit
def sgd_momentum(g, m, base, beta, one_minus_beta, weight_decay):
    """The momentum of ``reference.sgd_piece_``/``plain_sgd_piece_``: ``beta*m + (1-beta)*(g + wd*w)``."""
    g = tl.where(weight_decay != 0.0, g + weight_decay * base, g)
    return beta * m + one_minus_beta * g


@triton.jit
def quantize_values(w_tilde, inv_scale, h, WEIGHT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Grid value (fp32, ``code`` itself for INT4, the E4M3 value for FP8) of ``w~ * inv_scale``.

    ``h``: the element's hash in the weight stream (stochastic rounding).
    """
    y = w_tilde * inv_scale
    if WEIGHT == WEIGHT_INT4:
        y = tl.minimum(tl.maximum(y, -INT4_RHO), INT4_RHO)
        if STOCHASTIC:
            lower = tl.floor(y)
            grid = tl.minimum(tl.maximum(tl.where(uniform_of(h) < y - lower, lower + 1.0, lower), -INT4_RHO),
                              INT4_RHO)
        else:
            grid = e4m3.round_half_even(y)
    elif STOCHASTIC:
        grid = e4m3.round_stochastic(tl.minimum(tl.maximum(y, -FP8_RHO), FP8_RHO), ~h)
    else:
        grid = y  # both encoders round and saturate at 448; decode(encode(y)) gives the grid value
    return grid


@triton.jit
def encode_weight(grid, WEIGHT: tl.constexpr, STOCHASTIC: tl.constexpr, TARGET: tl.constexpr):
    """``(code, stored grid value)`` of a grid value: INT4 ``code + 8``, E4M3 byte."""
    if WEIGHT == WEIGHT_INT4:
        code = grid.to(tl.int32) + 8
        stored = (code - 8).to(tl.float32)  # as the reference decodes it (-0.0 becomes +0.0)
    elif TARGET >= 89:
        code = e4m3.encode_native(grid)
        stored = grid if STOCHASTIC else e4m3.decode_native(code)  # a stochastic grid value is exact
    else:
        code = e4m3.encode_nearest(grid)
        stored = grid if STOCHASTIC else e4m3.decode(code)
    return code, stored


@triton.jit
def eco_step_kernel(
    codes_ptr, scales_ptr, workspace_ptr, gmax_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, exp_avg_sq_ptr,
    exp_avg_sq_scale_ptr, v_row_ptr, v_col_ptr, v_mean_ptr, master_ptr, src_ptr,
    n_cols, code_cols, rows_per_scale, n_scale_groups, matrix_rows,
    w_stride, w_base, m_stride, m_base, v_stride, v_base,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, M_FMT: tl.constexpr,
    V_FMT: tl.constexpr, TARGET: tl.constexpr,
):
    """One ECO step (a plain step for ``WEIGHT_PLAIN``; a quantize, ``OPT == OPT_QUANTIZE``) for a
    ``BLOCK``-element tile of one row.

    ``codes_ptr`` is the uint8 view of the codes ``[rows, code_cols]``;
    ``scales_ptr`` the fp32 scales in :meth:`QuantFormat.grouped` order;
    ``workspace_ptr`` (``GROUP_SIZE == 0`` only) int32 ``[2, n_scale_groups]``:
    absmax bits, then the old scale's bits. ``rows_per_scale`` is 1 for
    row-wise FP8 and the matrix height for tensor-wise INT4. ``exp_avg*``: the
    moments (8-bit formats: codes, and ``*_scale_ptr`` their block scales);
    ``v_row/col/mean_ptr``, ``gmax_ptr`` (int32 ``[matrices]``, zeroed): a
    factored second moment, ``matrix_rows`` rows per matrix. ``*_stride``,
    ``*_base``: ``rng.key`` of the weight, m and v streams at the tensor's
    first element. Grid: rows x column tiles; the work is :func:`eco_tile`.
    """
    eco_tile(codes_ptr, scales_ptr, workspace_ptr, gmax_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, exp_avg_sq_ptr,
             exp_avg_sq_scale_ptr, v_row_ptr, v_col_ptr, v_mean_ptr, master_ptr, src_ptr,
             tl.program_id(0).to(tl.int64), tl.program_id(1), n_cols, code_cols, rows_per_scale, n_scale_groups,
             matrix_rows, n_cols, w_stride, w_base, m_stride, m_base, v_stride, v_base,
             k0, k1, k2, k3, k4, k5, k6, k7, inject,
             OPT, WEIGHT, GROUP_SIZE, BLOCK, STOCHASTIC, HAS_MASTER, PASS, M_FMT, V_FMT, False, TARGET)


@triton.jit
def eco_tile(
    codes_ptr, scales_ptr, workspace_ptr, gmax_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, exp_avg_sq_ptr,
    exp_avg_sq_scale_ptr, v_row_ptr, v_col_ptr, v_mean_ptr, master_ptr, src_ptr,
    row, tile, n_cols, code_cols, rows_per_scale, n_scale_groups, matrix_rows, row_length,
    w_stride, w_base, m_stride, m_base, v_stride, v_base,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, M_FMT: tl.constexpr,
    V_FMT: tl.constexpr, FLAT: tl.constexpr, TARGET: tl.constexpr,
):
    """The ECO tile logic (the one copy of it): column tile ``tile`` of row ``row`` (int64) of one tensor.

    Arguments as :func:`eco_step_kernel`. ``FLAT``: the tensor is given as
    one row of ``n_cols`` elements (:func:`eco_multi_step_kernel`, block/group
    formats and plain parameters), whose real rows are ``row_length`` long
    (a multiple of ``STATE_BLOCK`` when a state is 8-bit or factored).
    ``k0..k7``: the host scalars in the slots of ``eco.kernels.launcher.SCALAR_SLOTS``. AdamW: ``beta1, 1-beta1,
    beta2, 1-beta2, inv_bc2, eps, decay, step_size``; SGD: ``beta, 1-beta, weight_decay, lr``.
    """
    W: tl.constexpr = GROUP_SIZE if GROUP_SIZE > 0 else STATE_BLOCK
    NG: tl.constexpr = STATE_BLOCK // W
    NB: tl.constexpr = BLOCK // STATE_BLOCK
    RHO: tl.constexpr = INT4_RHO if WEIGHT == WEIGHT_INT4 else FP8_RHO
    QUANTIZED: tl.constexpr = WEIGHT != WEIGHT_PLAIN
    TWO_PASS: tl.constexpr = QUANTIZED and GROUP_SIZE == 0
    FACTORED: tl.constexpr = OPT == OPT_ADAMW and V_FMT == STATE_FACTORED
    GMAX_PASS: tl.constexpr = 0 if TWO_PASS else 1  # the pass that reduces max |g| (before any absmax is reduced)

    block_col = tile * BLOCK + tl.arange(0, NB)[:, None, None] * STATE_BLOCK  # first column of each state block
    group_col = block_col + tl.arange(0, NG)[None, :, None] * W
    col = group_col + tl.arange(0, W)[None, None, :]
    mask = col < n_cols
    block_mask = block_col < n_cols
    offsets = row * n_cols + col
    state_block = row * tl.cdiv(n_cols, STATE_BLOCK) + block_col // STATE_BLOCK
    if WEIGHT == WEIGHT_INT4:  # one byte per pair of elements: contiguous bytes, unpacked in registers
        code_col = group_col // 2 + tl.arange(0, W // 2)[None, None, :]
    else:
        code_col = col
    code_mask = code_col < code_cols
    code_offsets = row * code_cols + code_col

    # Old scale: one per group of the tile ([NB, NG, 1]), or one per row/matrix.
    if QUANTIZED:
        if GROUP_SIZE > 0:
            group_mask = group_col < n_cols
            group_index = (row * n_cols + group_col) // GROUP_SIZE
            old_scale = tl.load(scales_ptr + group_index, mask=group_mask, other=1.0)
        else:
            scale_index = row // rows_per_scale
            owns_scale = (tile == 0) & (row % rows_per_scale == 0)
            if PASS == 0:
                old_scale = tl.load(scales_ptr + scale_index)
            else:
                old_scale = tl.load(workspace_ptr + n_scale_groups + scale_index).to(tl.float32, bitcast=True)

    if HAS_MASTER:
        base = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    elif not QUANTIZED:
        base = tl.load(codes_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        byte = tl.load(codes_ptr + code_offsets, mask=code_mask, other=0).to(tl.int32)
        if WEIGHT == WEIGHT_INT4:
            base = (unpack_nibbles(byte, NB, NG, W) - 8).to(tl.float32) * old_scale
        else:
            base = decode_e4m3(byte, TARGET) * old_scale

    if OPT == OPT_QUANTIZE:
        w_tilde = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_tilde = w_tilde  # unused: nothing is stored but the codes and scales
    else:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = load_state(exp_avg_ptr, exp_avg_scale_ptr, offsets, state_block, mask, block_mask, M_FMT, False, TARGET)
        if OPT == OPT_ADAMW:
            if FACTORED:
                if FLAT:  # a state block lies in one real row
                    v_row_index = block_col // row_length
                    v_col_index = col - v_row_index * row_length
                else:
                    v_row_index = row + tl.zeros_like(block_col).to(tl.int64)
                    v_col_index = col
                matrix = v_row_index // matrix_rows
                mean = tl.load(v_mean_ptr + matrix, mask=block_mask, other=0.0)
                live = mean > 0.0
                norm = tl.where(live, tl.math.div_rn(tl.load(v_col_ptr + matrix * row_length + v_col_index, mask=mask,
                                                                 other=0.0), tl.where(live, mean, 1.0)), 0.0)
                v = tl.load(v_row_ptr + v_row_index, mask=block_mask, other=0.0) * norm
                if PASS == GMAX_PASS:  # max |g| per matrix, for the fixed-point sums of g*g
                    g_abs = tl.max(tl.max(tl.abs(g), axis=2), axis=1)
                    if FLAT:
                        tl.atomic_max(gmax_ptr + matrix.reshape(NB), g_abs.to(tl.int32, bitcast=True),
                                      mask=block_mask.reshape(NB), sem="relaxed")
                    else:
                        tl.atomic_max(gmax_ptr + row // matrix_rows, tl.max(g_abs, axis=0).to(tl.int32, bitcast=True),
                                      sem="relaxed")
            else:
                v = load_state(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, offsets, state_block, mask, block_mask, V_FMT,
                               True, TARGET)
            m_tilde, v_new, d = adamw_moments(g, m, v, k0, k1, k2, k3, k4, k5)
            w_tilde = base * k6 - k7 * tl.math.div_rn(m_tilde, d)
        else:
            m_tilde = sgd_momentum(g, m, base, k0, k1, k2)
            d = 1.0
            w_tilde = base - k3 * m_tilde
        if QUANTIZED:
            w_tilde = saturate(w_tilde)
        w_tilde = tl.where(mask, w_tilde, 0.0)  # masked lanes never raise an absmax

    if TWO_PASS:
        if PASS == 0:
            tl.atomic_max(workspace_ptr + scale_index, tl.max(tl.abs(w_tilde)).to(tl.int32, bitcast=True))
            tl.store(workspace_ptr + n_scale_groups + scale_index, old_scale.to(tl.int32, bitcast=True),
                     mask=owns_scale)
            return
        absmax = tl.load(workspace_ptr + scale_index).to(tl.float32, bitcast=True)

    m_new = m_tilde
    if QUANTIZED:
        if GROUP_SIZE > 0:
            scale, inv_scale = block_scale_pair(tl.max(tl.abs(w_tilde), axis=2)[:, :, None], RHO)
            tl.store(scales_ptr + group_index, scale, mask=group_mask)
        else:
            scale, inv_scale = block_scale_pair(absmax, RHO)
            tl.store(scales_ptr + scale_index, scale, mask=owns_scale)
        h = stream_hash(offsets, w_stride, w_base) if STOCHASTIC else 0
        code, stored = encode_weight(quantize_values(w_tilde, inv_scale, h, WEIGHT, STOCHASTIC), WEIGHT, STOCHASTIC,
                                     TARGET)
        if WEIGHT == WEIGHT_INT4:
            code = pack_nibbles(tl.where(mask, code, 8), NB, NG, W)  # an odd last dimension pads with code 0
        tl.store(codes_ptr + code_offsets, code.to(tl.uint8), mask=code_mask)
        if OPT != OPT_QUANTIZE:
            if HAS_MASTER:
                tl.store(master_ptr + offsets, w_tilde, mask=mask)
            else:
                m_new = tl.where(inject != 0.0, saturate(m_tilde + (inject * d) * (w_tilde - stored * scale)),
                                 m_tilde)
    else:
        store_rne(codes_ptr, offsets, w_tilde, mask, TARGET)
    if OPT != OPT_QUANTIZE:
        store_state(exp_avg_ptr, exp_avg_scale_ptr, offsets, state_block, mask, block_mask, tl.where(mask, m_new, 0.0),
                    offsets, m_stride, m_base, M_FMT, False, TARGET)
        if OPT == OPT_ADAMW and not FACTORED:
            store_state(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, offsets, state_block, mask, block_mask,
                        tl.where(mask, v_new, 0.0), offsets, v_stride, v_base, V_FMT, True, TARGET)


@triton.jit
def eco_multi_step_kernel(
    codes_ptr, scales_ptr, workspace_ptr, gmax_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, exp_avg_sq_ptr,
    exp_avg_sq_scale_ptr, v_row_ptr, v_col_ptr, v_mean_ptr, master_ptr, table_ptr,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, M_FMT: tl.constexpr,
    V_FMT: tl.constexpr, TARGET: tl.constexpr,
):
    """The ECO step of many tensors (one format, state formats, dtypes and scalars) in one launch: :func:`eco_tile`.

    The pointers are those of the list's first tensor; ``table_ptr`` (int64)
    holds, per program, ``[tensor index, row, column tile]`` and then, per
    tensor (starting at ``3 * n_programs``; word offsets ``STEP_*``), its
    geometry, its three streams' keys and each pointer's element offset from
    the first tensor's (``workspace``, ``gmax``: this tensor's slices of one
    shared workspace). The launcher groups only tensors whose last dimension
    is a multiple of 16 (of 128 with 8-bit or factored states) and whose
    streams are 16-byte aligned, so the hints below hold and the accesses are
    as wide as in :func:`eco_step_kernel`. Row-wise/tensor-wise formats run
    this twice (``PASS`` 0 for every tensor, then ``PASS`` 1), like the single
    kernel. Block/group formats and plain parameters are given each tensor as
    one row of ``numel`` elements (groups and state blocks never straddle rows;
    element ``i`` draws the same random numbers), so that the tiles of narrow
    matrices are full.
    """
    FLAT: tl.constexpr = WEIGHT == WEIGHT_PLAIN or GROUP_SIZE > 0
    pid = tl.program_id(0)
    program = table_ptr + MULTI_PROGRAM_WORDS * pid
    tensor = tl.load(program + STEP_PROGRAM_TENSOR)
    row = tl.load(program + STEP_PROGRAM_ROW)
    tile = tl.load(program + STEP_PROGRAM_TILE).to(tl.int32)
    entry = table_ptr + MULTI_PROGRAM_WORDS * tl.num_programs(0) + MULTI_TENSOR_WORDS * tensor
    n_cols = tl.multiple_of(tl.load(entry + STEP_N_COLS).to(tl.int32), 16)
    code_cols = tl.multiple_of(tl.load(entry + STEP_CODE_COLS).to(tl.int32), 8 if WEIGHT == WEIGHT_INT4 else 16)
    grad = grad_ptr + aligned_offset(grad_ptr, entry + STEP_GRAD)
    eco_tile(codes_ptr + aligned_offset(codes_ptr, entry + STEP_CODES),
             scales_ptr + aligned_offset(scales_ptr, entry + STEP_SCALES),
             workspace_ptr + tl.load(entry + STEP_WORKSPACE), gmax_ptr + tl.load(entry + STEP_GMAX), grad,
             exp_avg_ptr + aligned_offset(exp_avg_ptr, entry + STEP_EXP_AVG),
             exp_avg_scale_ptr + tl.load(entry + STEP_EXP_AVG_SCALE),
             exp_avg_sq_ptr + aligned_offset(exp_avg_sq_ptr, entry + STEP_EXP_AVG_SQ),
             exp_avg_sq_scale_ptr + tl.load(entry + STEP_EXP_AVG_SQ_SCALE),
             v_row_ptr + tl.load(entry + STEP_V_ROW), v_col_ptr + tl.load(entry + STEP_V_COL),
             v_mean_ptr + tl.load(entry + STEP_V_MEAN),
             master_ptr + aligned_offset(master_ptr, entry + STEP_MASTER), grad,
             row, tile, n_cols, code_cols, tl.load(entry + STEP_ROWS_PER_SCALE).to(tl.int32),
             tl.load(entry + STEP_N_SCALE_GROUPS).to(tl.int32), tl.load(entry + STEP_MATRIX_ROWS).to(tl.int32),
             tl.load(entry + STEP_ROW_LENGTH).to(tl.int32),
             tl.load(entry + STEP_W_STRIDE), tl.load(entry + STEP_W_BASE), tl.load(entry + STEP_M_STRIDE),
             tl.load(entry + STEP_M_BASE), tl.load(entry + STEP_V_STRIDE), tl.load(entry + STEP_V_BASE),
             k0, k1, k2, k3, k4, k5, k6, k7, inject,
             OPT, WEIGHT, GROUP_SIZE, BLOCK, STOCHASTIC, HAS_MASTER, PASS, M_FMT, V_FMT, FLAT, TARGET)


@triton.jit
def decode_e4m3(byte, TARGET: tl.constexpr):
    """:func:`e4m3.decode`, with the hardware conversion where the target has one (sm_89+)."""
    if TARGET >= 89:
        return e4m3.decode_native(byte)
    else:
        return e4m3.decode(byte)


@triton.jit
def unpack_nibbles(byte, NB: tl.constexpr, NG: tl.constexpr, W: tl.constexpr):
    """``[NB, NG, W // 2]`` packed bytes -> ``[NB, NG, W]`` INT4 codes 0..15 (low nibble: the even element)."""
    return tl.join(byte & 0xF, byte >> 4).reshape(NB, NG, W)


@triton.jit
def pack_nibbles(code, NB: tl.constexpr, NG: tl.constexpr, W: tl.constexpr):
    """``[NB, NG, W]`` INT4 codes 0..15 -> ``[NB, NG, W // 2]`` bytes (the inverse of :func:`unpack_nibbles`)."""
    even, odd = tl.split(code.reshape(NB, NG, W // 2, 2))
    return even | (odd << 4)


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, out_ptr, n_cols, code_cols, rows_per_scale,
                      IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr, TARGET: tl.constexpr):
    """``code * scale`` (fp32) cast to the output dtype, for a ``BLOCK``-element tile of one row."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n_cols
    offsets = row * n_cols + col
    if GROUP_SIZE > 0:
        scale = tl.load(scales_ptr + offsets // GROUP_SIZE, mask=mask, other=1.0)
    else:
        scale = tl.load(scales_ptr + row // rows_per_scale)
    if IS_INT4:
        code_col = tl.program_id(1) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, None, :]
        byte = tl.load(codes_ptr + row * code_cols + code_col, mask=code_col < code_cols, other=0).to(tl.int32)
        code = unpack_nibbles(byte, 1, 1, BLOCK).reshape(BLOCK) - 8
        value = code.to(tl.float32) * scale
    else:
        value = decode_e4m3(tl.load(codes_ptr + offsets, mask=mask, other=0), TARGET) * scale
    store_rne(out_ptr, offsets, value, mask, TARGET)


@triton.jit
def plain_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, m_stride, m_base, v_stride, v_base,
               k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, STATE: tl.constexpr, TARGET: tl.constexpr):
    """``reference.plain_adamw_piece_`` / ``plain_sgd_piece_`` on one tile of a parameter whose moments are both
    ``STATE`` (fp32, or bf16 stored with stochastic rounding; scalars as in :func:`eco_tile`)."""
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_ADAMW:
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_new, v_new, d = adamw_moments(g, m, v, k0, k1, k2, k3, k4, k5)
        p_new = p * k6 - k7 * tl.math.div_rn(m_new, d)
        store_state(exp_avg_sq_ptr, exp_avg_sq_ptr, offsets, offsets, mask, mask, v_new, offsets, v_stride, v_base,
                    STATE, True, TARGET)
    else:
        m_new = sgd_momentum(g, m, p, k0, k1, k2)
        p_new = p - k3 * m_new
    store_rne(param_ptr, offsets, p_new, mask, TARGET)
    store_state(exp_avg_ptr, exp_avg_ptr, offsets, offsets, mask, mask, m_new, offsets, m_stride, m_base, STATE,
                False, TARGET)


@triton.jit
def plain_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, m_stride, m_base, v_stride, v_base,
                      k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, STATE: tl.constexpr, BLOCK: tl.constexpr,
                      TARGET: tl.constexpr):
    """Plain AdamW/SGD step of one tensor, ``BLOCK`` elements per program."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    plain_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < numel, m_stride, m_base,
               v_stride, v_base, k0, k1, k2, k3, k4, k5, k6, k7, OPT, STATE, TARGET)


@triton.jit
def plain_multi_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, table_ptr,
                            k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, STATE: tl.constexpr,
                            BLOCK: tl.constexpr, TARGET: tl.constexpr):
    """Plain AdamW/SGD step of many tensors in one launch.

    The four pointers are the first tensor of each list; ``table_ptr`` (int64)
    holds, per program, ``[tensor index, first element]`` and then, per tensor
    (starting at ``2 * n_programs``; word offsets ``PLAIN_*``), its numel, the
    keys of its m and v streams and each tensor's element offset from the
    list's first tensor (all tensors of one list share a dtype, so such
    offsets are whole elements). The launcher only groups tensors whose numel
    is a multiple of 16 and whose storage is 16-byte aligned, so the loads and
    stores are 128-bit.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    program = table_ptr + PLAIN_PROGRAM_WORDS * pid
    tensor = tl.load(program + PLAIN_PROGRAM_TENSOR)
    start = tl.multiple_of(tl.load(program + PLAIN_PROGRAM_START), BLOCK)
    entry = table_ptr + PLAIN_PROGRAM_WORDS * n_programs + PLAIN_TENSOR_WORDS * tensor
    numel = tl.multiple_of(tl.load(entry + PLAIN_NUMEL), 16)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    plain_tile(param_ptr + aligned_offset(param_ptr, entry + PLAIN_PARAM),
               grad_ptr + aligned_offset(grad_ptr, entry + PLAIN_GRAD),
               exp_avg_ptr + aligned_offset(exp_avg_ptr, entry + PLAIN_EXP_AVG),
               exp_avg_sq_ptr + aligned_offset(exp_avg_sq_ptr, entry + PLAIN_EXP_AVG_SQ), offsets, mask,
               tl.load(entry + PLAIN_M_STRIDE), tl.load(entry + PLAIN_M_BASE), tl.load(entry + PLAIN_V_STRIDE),
               tl.load(entry + PLAIN_V_BASE), k0, k1, k2, k3, k4, k5, k6, k7, OPT, STATE, TARGET)


@triton.jit
def aligned_offset(ptr, offset_ptr):
    """The element offset at ``offset_ptr``, hinted a multiple of 16 bytes of ``ptr``'s dtype (launcher-checked)."""
    return tl.multiple_of(tl.load(offset_ptr), 128 // ptr.dtype.element_ty.primitive_bitwidth)

