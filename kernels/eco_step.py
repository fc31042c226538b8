"""The Triton kernels of the ECO step (launched by ``eco.kernels.steps``; bytes moved: ``eco.kernels.traffic``).

Every expression mirrors ``eco/reference.py`` in the same order, in fp32, with
host scalars passed as fp32, IEEE division (``div_rn``) and square root
(``sqrt_rn``) where the reference divides or takes a root, and no FMA
contraction (launched with ``enable_fp_fusion=False``). That is what makes the
codes bit-identical to the reference under round-to-nearest.

``TARGET`` (a constexpr: the compute capability compiled for, 0 under the
interpreter; see ``specs.KernelSpec.constexprs_for``) picks the conversions:
bf16 stores use the hardware's round-to-nearest-even when compiled, and
sm_89+ encodes/decodes E4M3 with its conversion instructions; sm_80 and the
interpreter use the bit codec of ``e4m3``.

Tiles: a program owns ``BLOCK`` logical elements of one row (grid = rows x
column tiles), viewed as ``[BLOCK // GW, GW]`` so that a block/group format
(``GROUP_SIZE > 0``, ``GW = GROUP_SIZE``) reduces its absmax along axis 1 in
registers. Row-wise FP8 and tensor-wise INT4 (``GROUP_SIZE == 0``) take two launches of the
same kernel: ``PASS == 0`` computes ``w~`` and atomically maxes ``|w~|`` (as
int32 bits of a non-negative float, which order like the floats) into a
workspace, and saves the old scale; ``PASS == 1`` recomputes the identical
``w~`` from the unchanged inputs, quantizes with the finished absmax and
stores. INT4 tiles hold elements like FP8 ones (so grad, m, v are read with
contiguous vector loads); the code bytes (even element in the low nibble, odd
in the high) are loaded contiguously and unpacked with ``tl.join``, and packed
back with ``tl.split`` before the store. The tile logic is :func:`eco_tile`,
once: ``eco_step_kernel`` runs it for one tensor (grid rows x tiles),
``eco_multi_step_kernel`` for many (a table gives each program its tensor,
row and tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from eco import formats

from . import e4m3

# Globals a @triton.jit function reads must be tl.constexpr.
ZERO_GROUP_ABSMAX = tl.constexpr(formats.ZERO_GROUP_ABSMAX)
FP8_RHO = tl.constexpr(formats.FP8.rho)
INT4_RHO = tl.constexpr(formats.INT4.rho)

# The OPT constexpr: which update a kernel applies.
OPT_ADAMW = tl.constexpr(0)
OPT_SGD = tl.constexpr(1)
OPT_QUANTIZE = tl.constexpr(2)  # no optimizer: w~ is the input tensor (quantize kernels)

# Word offsets in the int64 launch tables of the multi-tensor kernels (built by ``eco.kernels.launcher``):
# one record per program, then one per tensor, each tensor's stream offsets in elements of that stream.
STEP_PROGRAM_TENSOR, STEP_PROGRAM_ROW, STEP_PROGRAM_TILE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MULTI_PROGRAM_WORDS = tl.constexpr(3)
(STEP_N_COLS, STEP_CODE_COLS, STEP_ROWS_PER_SCALE, STEP_N_SCALE_GROUPS, STEP_SEED, STEP_CODES, STEP_SCALES,
 STEP_WORKSPACE, STEP_GRAD, STEP_EXP_AVG, STEP_EXP_AVG_SQ, STEP_MASTER) = (tl.constexpr(i) for i in range(12))
MULTI_TENSOR_WORDS = tl.constexpr(12)
PLAIN_PROGRAM_TENSOR, PLAIN_PROGRAM_START = tl.constexpr(0), tl.constexpr(1)
PLAIN_PROGRAM_WORDS = tl.constexpr(2)
PLAIN_NUMEL, PLAIN_PARAM, PLAIN_GRAD, PLAIN_EXP_AVG, PLAIN_EXP_AVG_SQ = (tl.constexpr(i) for i in range(5))
PLAIN_TENSOR_WORDS = tl.constexpr(5)
# Philox4x32 rounds for stochastic rounding (Triton's default is 10); 7 rounds pass
# TestU01's BigCrush (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even on the bits (the interpreter's cast truncates)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_state(ptr, offsets, value, mask, TARGET: tl.constexpr):
    """Store fp32 ``value`` into a state tensor of fp32 or bf16 (rounded to nearest even).

    Compiled (``TARGET > 0``) the hardware conversion rounds to nearest even;
    the interpreter's cast truncates, so there it is done on the bits.
    """
    if ptr.dtype.element_ty == tl.bfloat16 and TARGET == 0:
        tl.store(ptr + offsets, to_bf16_rne(value), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def adamw_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2, eps):
    """``reference._adam_moments``: returns ``m~, v', d``."""
    m_new = beta1 * m + one_minus_beta1 * g
    v_new = beta2 * v + one_minus_beta2 * (g * g)
    d = tl.math.sqrt_rn(v_new * inv_bc2) + eps
    return m_new, v_new, d


@triton.jit
def sgd_momentum(g, m, base, beta, one_minus_beta, weight_decay):
    """The momentum of ``reference.sgd_step_``/``plain_sgd_step_``: ``beta*m + (1-beta)*(g + wd*w)``."""
    g = tl.where(weight_decay != 0.0, g + weight_decay * base, g)
    return beta * m + one_minus_beta * g


@triton.jit
def w_tilde_of(offsets, mask, base, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, src_ptr,
               k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr):
    """``m~, v', d, w~`` of the elements at ``offsets`` (``base`` is deq(w) or the master).

    ``k0..k7``: the host scalars in the slots of ``eco.kernels.launcher.SCALAR_SLOTS``. AdamW: ``beta1, 1-beta1,
    beta2, 1-beta2, inv_bc2, eps, decay, step_size``; SGD: ``beta, 1-beta, weight_decay, lr``. Quantize: ``w~``
    is ``src``.
    Masked-off lanes give ``w~ = 0`` so that they never raise an absmax.
    """
    zero = tl.zeros_like(base)
    if OPT == OPT_QUANTIZE:
        w_tilde = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        return zero, zero, zero, w_tilde
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_ADAMW:
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_tilde, v_new, d = adamw_moments(g, m, v, k0, k1, k2, k3, k4, k5)
        w_tilde = base * k6 - k7 * tl.math.div_rn(m_tilde, d)
    else:
        m_tilde = sgd_momentum(g, m, base, k0, k1, k2)
        v_new = zero
        d = zero + 1.0
        w_tilde = base - k3 * m_tilde
    return m_tilde, v_new, d, tl.where(mask, w_tilde, 0.0)


@triton.jit
def scale_pair(absmax, RHO: tl.constexpr):
    """``FP8/INT4.scales_for``: ``(scale, inv_scale)``; a (near-)zero group gets ``(1, 0)``."""
    live = absmax > ZERO_GROUP_ABSMAX
    safe = tl.where(live, absmax, 1.0)
    scale = tl.where(live, tl.math.div_rn(safe, RHO), 1.0)
    inv_scale = tl.where(live, tl.math.div_rn(RHO + tl.zeros_like(safe), safe), 0.0)
    return scale, inv_scale


@triton.jit
def tile_random_bits(seed, row, first_col, n_cols, ROWS: tl.constexpr, COLS: tl.constexpr):
    """32 random bits (uint32) per element of the ``[ROWS, COLS]`` tile of ``row`` starting at ``first_col``.

    One Philox call (key = ``seed``) serves four consecutive elements of a row:
    counter ``row * ceil(n_cols / 4) + col // 4``, output ``col % 4``. So each
    element's bits depend on its position only (not on the tiling), and every
    element of a step gets its own 32 bits. ``PHILOX_ROUNDS`` rounds.
    """
    quad = (first_col + tl.arange(0, ROWS)[:, None] * COLS + 4 * tl.arange(0, COLS // 4)[None, :]) // 4
    r0, r1, r2, r3 = tl.randint4x(seed, row * ((n_cols + 3) // 4) + quad, PHILOX_ROUNDS)
    return tl.join(tl.join(r0, r2), tl.join(r1, r3)).reshape(ROWS, COLS)


@triton.jit
def quantize_values(w_tilde, inv_scale, random_bits, IS_INT4: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Grid value (fp32, ``code`` itself for INT4, the E4M3 value for FP8) of ``w~ * inv_scale``.

    Stochastic rounding uses ``random_bits`` (see :func:`tile_random_bits`).
    A NaN (only reachable when a caller bypasses the optimizer's finite check) becomes 0.
    """
    y = w_tilde * inv_scale
    y = tl.where(y == y, y, 0.0)
    if IS_INT4:
        y = tl.minimum(tl.maximum(y, -INT4_RHO), INT4_RHO)
        if STOCHASTIC:
            u = (random_bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
            lower = tl.floor(y)
            grid = tl.minimum(tl.maximum(tl.where(u < y - lower, lower + 1.0, lower), -INT4_RHO), INT4_RHO)
        else:
            grid = e4m3.round_half_even(y)
    elif STOCHASTIC:
        grid = e4m3.round_stochastic(tl.minimum(tl.maximum(y, -FP8_RHO), FP8_RHO), random_bits)
    else:
        grid = y  # both encoders round and saturate at 448; decode(encode(y)) gives the grid value
    return grid


@triton.jit
def finish_element(w_tilde, m_tilde, v_new, d, scale, inv_scale, offsets, mask, random_bits, inject,
                   exp_avg_ptr, exp_avg_sq_ptr, master_ptr,
                   OPT: tl.constexpr, IS_INT4: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr,
                   TARGET: tl.constexpr):
    """Quantize ``w~``, inject the error into ``m``, store the moments; return the code bits."""
    grid = quantize_values(w_tilde, inv_scale, random_bits, IS_INT4, STOCHASTIC)
    if IS_INT4:
        code = grid.to(tl.int32) + 8
        stored = (code - 8).to(tl.float32)  # as the reference decodes it (-0.0 becomes +0.0)
    elif TARGET >= 89:
        code = e4m3.encode_native(grid)
        stored = grid if STOCHASTIC else e4m3.decode_native(code)  # a stochastic grid value is exact
    else:
        code = e4m3.encode_nearest(grid)
        stored = grid if STOCHASTIC else e4m3.decode(code)
    if OPT != OPT_QUANTIZE:
        m_new = m_tilde
        if not HAS_MASTER:
            error = w_tilde - stored * scale
            m_new = tl.where(inject != 0.0, m_tilde + (inject * d) * error, m_tilde)
        else:
            tl.store(master_ptr + offsets, w_tilde, mask=mask)
        store_state(exp_avg_ptr, offsets, m_new, mask, TARGET)
        if OPT == OPT_ADAMW:
            store_state(exp_avg_sq_ptr, offsets, v_new, mask, TARGET)
    return code


@triton.jit
def eco_step_kernel(
    codes_ptr, scales_ptr, workspace_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, src_ptr,
    n_cols, code_cols, rows_per_scale, n_scale_groups, seed,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, TARGET: tl.constexpr,
):
    """One ECO step (or a plain quantize, ``OPT == OPT_QUANTIZE``) for a ``BLOCK``-element tile of one row.

    ``codes_ptr`` is the uint8 view of the codes ``[rows, code_cols]``;
    ``scales_ptr`` the fp32 scales in :meth:`QuantFormat.grouped` order;
    ``workspace_ptr`` (``GROUP_SIZE == 0`` only) int32 ``[2, n_scale_groups]``:
    absmax bits, then the old scale's bits. ``rows_per_scale`` is 1 for
    row-wise FP8 and the matrix height for tensor-wise INT4.
    Grid: rows x column tiles; the work is :func:`eco_tile`.
    """
    eco_tile(codes_ptr, scales_ptr, workspace_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, src_ptr,
             tl.program_id(0).to(tl.int64), tl.program_id(1), n_cols, code_cols, rows_per_scale, n_scale_groups,
             seed, k0, k1, k2, k3, k4, k5, k6, k7, inject,
             OPT, IS_INT4, GROUP_SIZE, BLOCK, STOCHASTIC, HAS_MASTER, PASS, TARGET)


@triton.jit
def eco_tile(
    codes_ptr, scales_ptr, workspace_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, src_ptr,
    row, tile, n_cols, code_cols, rows_per_scale, n_scale_groups, seed,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, TARGET: tl.constexpr,
):
    """The ECO tile logic (the one copy of it): column tile ``tile`` of row ``row`` (int64) of one tensor.

    Arguments as :func:`eco_step_kernel`; :func:`eco_multi_step_kernel` calls
    it with pointers already offset to the tensor its program works on.
    """
    GW: tl.constexpr = GROUP_SIZE if GROUP_SIZE > 0 else BLOCK
    RHO: tl.constexpr = INT4_RHO if IS_INT4 else FP8_RHO
    i = tl.arange(0, BLOCK // GW)[:, None]
    col = tile * BLOCK + i * GW + tl.arange(0, GW)[None, :]
    mask = col < n_cols
    offsets = row * n_cols + col
    if IS_INT4:  # one byte per pair of elements: contiguous bytes, unpacked in registers
        code_col = tile * (BLOCK // 2) + i * (GW // 2) + tl.arange(0, GW // 2)[None, :]
    else:
        code_col = col
    code_mask = code_col < code_cols
    code_offsets = row * code_cols + code_col

    # Old scale: one per group of the tile ([BLOCK // GW, 1]), or one per row/matrix.
    if GROUP_SIZE > 0:
        group_first_col = tile * BLOCK + i * GW
        group_mask = group_first_col < n_cols
        group_index = (row * n_cols + group_first_col) // GROUP_SIZE
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
    else:
        byte = tl.load(codes_ptr + code_offsets, mask=code_mask, other=0).to(tl.int32)
        if IS_INT4:
            base = (unpack_nibbles(byte, BLOCK // GW, GW) - 8).to(tl.float32) * old_scale
        else:
            base = decode_e4m3(byte, TARGET) * old_scale
    m_t, v_n, d, w_t = w_tilde_of(offsets, mask, base, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, src_ptr,
                                  k0, k1, k2, k3, k4, k5, k6, k7, OPT)
    absmax = tl.max(tl.abs(w_t), axis=1)

    if GROUP_SIZE == 0:
        if PASS == 0:
            tl.atomic_max(workspace_ptr + scale_index, tl.max(absmax, axis=0).to(tl.int32, bitcast=True))
            tl.store(workspace_ptr + n_scale_groups + scale_index, old_scale.to(tl.int32, bitcast=True),
                     mask=owns_scale)
            return
        absmax = tl.load(workspace_ptr + scale_index).to(tl.float32, bitcast=True)
    scale, inv_scale = scale_pair(absmax, RHO)
    if GROUP_SIZE > 0:
        scale = scale[:, None]
        inv_scale = inv_scale[:, None]
        tl.store(scales_ptr + group_index, scale, mask=group_mask)
    else:
        tl.store(scales_ptr + scale_index, scale, mask=owns_scale)

    random_bits = tile_random_bits(seed, row, tile * BLOCK, n_cols, BLOCK // GW, GW) if STOCHASTIC else 0
    code = finish_element(w_t, m_t, v_n, d, scale, inv_scale, offsets, mask, random_bits, inject,
                          exp_avg_ptr, exp_avg_sq_ptr, master_ptr, OPT, IS_INT4, STOCHASTIC, HAS_MASTER, TARGET)
    if IS_INT4:
        code = pack_nibbles(tl.where(mask, code, 8), BLOCK // GW, GW)  # an odd last dimension pads with code 0
    tl.store(codes_ptr + code_offsets, code.to(tl.uint8), mask=code_mask)


@triton.jit
def eco_multi_step_kernel(
    codes_ptr, scales_ptr, workspace_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, table_ptr,
    k0, k1, k2, k3, k4, k5, k6, k7, inject,
    OPT: tl.constexpr, IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr, PASS: tl.constexpr, TARGET: tl.constexpr,
):
    """The ECO step of many quantized tensors (one format, dtypes and scalars) in one launch: :func:`eco_tile`.

    The pointers are those of the list's first tensor; ``table_ptr`` (int64)
    holds, per program, ``[tensor index, row, column tile]`` and then, per
    tensor (starting at ``3 * n_programs``; word offsets ``STEP_*``), ``[n_cols, code_cols,
    rows_per_scale, n_scale_groups, seed, codes, scales, workspace, grad,
    exp_avg, exp_avg_sq, master offsets]``: each stream's element offset from
    the first tensor's (``workspace``: this tensor's ``[2, n_scale_groups]``
    slice of one shared workspace). The launcher groups only tensors whose
    last dimension is a multiple of 16 and whose storages are 16-byte aligned,
    so the hints below hold and the accesses are as wide as in
    :func:`eco_step_kernel`. Row-wise/tensor-wise formats run this twice
    (``PASS`` 0 for every tensor, then ``PASS`` 1), like the single kernel.
    Block/group formats are given each tensor as one row of ``numel`` elements
    (groups never straddle rows; the random bits of element ``i`` are the same),
    so that the tiles of narrow matrices are full.
    """
    pid = tl.program_id(0)
    program = table_ptr + MULTI_PROGRAM_WORDS * pid
    tensor = tl.load(program + STEP_PROGRAM_TENSOR)
    row = tl.load(program + STEP_PROGRAM_ROW)
    tile = tl.load(program + STEP_PROGRAM_TILE).to(tl.int32)
    entry = table_ptr + MULTI_PROGRAM_WORDS * tl.num_programs(0) + MULTI_TENSOR_WORDS * tensor
    n_cols = tl.multiple_of(tl.load(entry + STEP_N_COLS).to(tl.int32), 16)
    code_cols = tl.multiple_of(tl.load(entry + STEP_CODE_COLS).to(tl.int32), 8 if IS_INT4 else 16)
    rows_per_scale = tl.load(entry + STEP_ROWS_PER_SCALE).to(tl.int32)
    n_scale_groups = tl.load(entry + STEP_N_SCALE_GROUPS).to(tl.int32)
    seed = tl.load(entry + STEP_SEED)
    grad = grad_ptr + aligned_offset(grad_ptr, entry + STEP_GRAD)
    eco_tile(codes_ptr + aligned_offset(codes_ptr, entry + STEP_CODES),
             scales_ptr + aligned_offset(scales_ptr, entry + STEP_SCALES),
             workspace_ptr + tl.load(entry + STEP_WORKSPACE), grad,
             exp_avg_ptr + aligned_offset(exp_avg_ptr, entry + STEP_EXP_AVG),
             exp_avg_sq_ptr + aligned_offset(exp_avg_sq_ptr, entry + STEP_EXP_AVG_SQ),
             master_ptr + aligned_offset(master_ptr, entry + STEP_MASTER), grad,
             row, tile, n_cols, code_cols, rows_per_scale, n_scale_groups, seed,
             k0, k1, k2, k3, k4, k5, k6, k7, inject,
             OPT, IS_INT4, GROUP_SIZE, BLOCK, STOCHASTIC, HAS_MASTER, PASS, TARGET)


@triton.jit
def decode_e4m3(byte, TARGET: tl.constexpr):
    """:func:`e4m3.decode`, with the hardware conversion where the target has one (sm_89+)."""
    if TARGET >= 89:
        return e4m3.decode_native(byte)
    else:
        return e4m3.decode(byte)


@triton.jit
def unpack_nibbles(byte, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS // 2]`` packed bytes -> ``[ROWS, COLS]`` INT4 codes 0..15 (low nibble: the even element)."""
    return tl.join(byte & 0xF, byte >> 4).reshape(ROWS, COLS)


@triton.jit
def pack_nibbles(code, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS]`` INT4 codes 0..15 -> ``[ROWS, COLS // 2]`` bytes (the inverse of :func:`unpack_nibbles`)."""
    even, odd = tl.split(code.reshape(ROWS, COLS // 2, 2))
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
        code_col = tl.program_id(1) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        byte = tl.load(codes_ptr + row * code_cols + code_col, mask=code_col < code_cols, other=0).to(tl.int32)
        code = unpack_nibbles(byte, 1, BLOCK).reshape(BLOCK) - 8
        value = code.to(tl.float32) * scale
    else:
        value = decode_e4m3(tl.load(codes_ptr + offsets, mask=mask, other=0), TARGET) * scale
    store_state(out_ptr, offsets, value, mask, TARGET)


@triton.jit
def plain_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask,
               k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, TARGET: tl.constexpr):
    """``reference.plain_adamw_step_`` / ``plain_sgd_step_`` on one tile (scalars as in :func:`w_tilde_of`)."""
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_ADAMW:
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_new, v_new, d = adamw_moments(g, m, v, k0, k1, k2, k3, k4, k5)
        p_new = p * k6 - k7 * tl.math.div_rn(m_new, d)
        store_state(exp_avg_sq_ptr, offsets, v_new, mask, TARGET)
    else:
        m_new = sgd_momentum(g, m, p, k0, k1, k2)
        p_new = p - k3 * m_new
    store_state(param_ptr, offsets, p_new, mask, TARGET)
    store_state(exp_avg_ptr, offsets, m_new, mask, TARGET)


@triton.jit
def plain_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel,
                      k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, BLOCK: tl.constexpr,
                      TARGET: tl.constexpr):
    """Plain AdamW/SGD step of one tensor, ``BLOCK`` elements per program."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    plain_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < numel,
               k0, k1, k2, k3, k4, k5, k6, k7, OPT, TARGET)


@triton.jit
def plain_multi_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, table_ptr,
                            k0, k1, k2, k3, k4, k5, k6, k7, OPT: tl.constexpr, BLOCK: tl.constexpr,
                            TARGET: tl.constexpr):
    """Plain AdamW/SGD step of many tensors in one launch.

    The four pointers are the first tensor of each list; ``table_ptr`` (int64)
    holds, per program, ``[tensor index, first element]`` and then, per tensor
    (starting at ``2 * n_programs``; word offsets ``PLAIN_*``), ``[numel, param, grad, exp_avg, exp_avg_sq
    offsets]``: each tensor's element offset from the list's first tensor (all
    tensors of one list share a dtype, so such offsets are whole elements).
    The launcher only groups tensors whose numel is a multiple of 16 and whose
    storage is 16-byte aligned, so the loads and stores are 128-bit.
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
               k0, k1, k2, k3, k4, k5, k6, k7, OPT, TARGET)


@triton.jit
def aligned_offset(ptr, offset_ptr):
    """The element offset at ``offset_ptr``, hinted a multiple of 16 bytes of ``ptr``'s dtype (launcher-checked)."""
    return tl.multiple_of(tl.load(offset_ptr), 128 // ptr.dtype.element_ty.primitive_bitwidth)
