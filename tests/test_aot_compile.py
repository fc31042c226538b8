"""Compile kernels for real GPU targets (sm_80, sm_90, sm_100) without a GPU.

The first half checks the machinery of ``eco.kernels.aot`` on small kernels
of this file whose compiled form is known (a copy kernel is 128-bit with
alignment hints and 32-bit without; a kernel holding 256 floats per thread
spills). The second half compiles every specialization the optimizer launches
(``eco.kernels`` list) for the three targets and asserts: it compiles, it does
not spill, it uses no local memory, and its big streams use 128-bit accesses.

Compilation runs in one child process per group (the tests run under the
interpreter, whose kernels cannot be compiled); results are cached per module.
"""

from __future__ import annotations

import pytest
import triton
import triton.language as tl
from eco.kernels.aot import H100_SXM, TARGETS, KernelBuild, compile_jobs, count_sass


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _row_sum(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * n + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + row, tl.sum(acc))


@triton.jit
def _hog(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # Every loaded value stays live across the reduction: BLOCK / 32 floats per thread.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x / tl.sum(x * x))


@triton.jit
def _fp8_hardware_cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x.to(tl.float8e4nv).to(tl.uint8, bitcast=True))


_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
_ALL = ("x_ptr", "y_ptr", "n")
_SMALL_BUILDS = {
    "copy_aligned": (KernelBuild.of(_copy, _SIG, {"BLOCK": 1024}, aligned=_ALL), tuple(TARGETS)),
    "copy_unaligned": (KernelBuild.of(_copy, _SIG, {"BLOCK": 1024}), ("sm_90",)),
    "row_sum": (KernelBuild.of(_row_sum, _SIG, {"BLOCK": 1024}, aligned=_ALL), ("sm_90",)),
    "hog": (KernelBuild.of(_hog, _SIG, {"BLOCK": 8192}, aligned=_ALL, num_warps=1), ("sm_90",)),
    "fp8_cast": (
        KernelBuild.of(_fp8_hardware_cast, {**_SIG, "y_ptr": "*u8"}, {"BLOCK": 1024}, aligned=_ALL),
        ("sm_80", "sm_90"),
    ),
}


@pytest.fixture(scope="module")
def small():
    """``{(name, target): CompiledKernel}`` for the kernels above, compiled in one child process."""
    keys = [(name, target) for name, (_, targets) in _SMALL_BUILDS.items() for target in targets]
    compiled = compile_jobs([(_SMALL_BUILDS[name][0], target) for name, target in keys])
    return dict(zip(keys, compiled, strict=True))


@pytest.mark.parametrize("target", list(TARGETS))
def test_aligned_copy_compiles_to_128_bit_accesses(small, target):
    copy = small[("copy_aligned", target)]
    assert copy.error is None
    assert copy.access_bits("x_ptr") == {128} and copy.access_bits("x_ptr", "store") == set()
    assert copy.access_bits("y_ptr") == {128} and copy.access_bits("y_ptr", "load") == set()
    assert copy.spill_bytes == 0 and copy.local_bytes == 0 and copy.stack_bytes == 0
    assert 0 < copy.registers <= 64
    # 1024 elements / 128 threads = 8 per thread: two 128-bit loads and two stores each.
    assert copy.sass_ops.get("LDG") == 2 and copy.sass_ops.get("STG") == 2
    assert copy.loops == 0


def test_unaligned_copy_is_scalar(small):
    """Without the 16-byte divisibility hints Triton must assume any alignment: 32-bit accesses."""
    copy = small[("copy_unaligned", "sm_90")]
    assert copy.access_bits("x_ptr") == {32}
    assert copy.access_bits("y_ptr") == {32}
    assert copy.sass_total > small[("copy_aligned", "sm_90")].sass_total


def test_spills_are_detected(small):
    hog = small[("hog", "sm_90")]
    assert hog.error is None
    assert hog.spill_store_bytes > 0 and hog.spill_load_bytes > 0
    assert hog.stack_bytes > 0


def test_loop_bodies_are_counted_per_iteration(small):
    row_sum = small[("row_sum", "sm_90")]
    assert row_sum.loops >= 1 and 0 < row_sum.sass_in_loops < row_sum.sass_total
    with pytest.raises(ValueError, match="per iteration"):
        row_sum.sass_per_element(elements_per_thread=8)
    # A row of 4096 elements, 8 per thread per iteration, 4 iterations: 32 per thread in all.
    straight = row_sum.sass_total - row_sum.sass_in_loops - row_sum.sass_in_subroutines
    expected = straight / 32 + row_sum.sass_in_loops / 8
    assert row_sum.sass_per_element(32, 8) == pytest.approx(expected)
    # The row pointer comes from x_ptr; the integer n must not be mistaken for a stream.
    assert set(row_sum.accesses) == {"x_ptr", "y_ptr"}


def test_hardware_fp8_cast_is_rejected_on_a100(small):
    """Why the kernels encode E4M3 on the bits: sm_80 has no float8e4nv conversion."""
    a100 = small[("fp8_cast", "sm_80")]
    assert a100.error is not None and "fp8e4nv" in a100.error
    assert small[("fp8_cast", "sm_90")].error is None


def test_sass_counting_of_loops_subroutines_padding_and_the_trap_branch():
    sass = """
        /*0000*/                   S2R R0, SR_TID.X ;
    .L_x_0:
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
        /*0030*/              @P1 CALL.REL.NOINC `(.L_x_2) ;
        /*0040*/                   EXIT ;
    .L_x_2:
        /*0050*/                   MUFU.RCP R1, R0 ;
        /*0060*/                   RET.REL.NODEC R2 `(.L_x_0) ;
    .L_x_1:
        /*0070*/                   BRA `(.L_x_1);
        /*0080*/                   NOP;
    """
    counts = count_sass(sass)
    assert counts["sass_total"] == 7  # S2R, IADD3, BRA (the loop), CALL, EXIT, MUFU, RET
    assert counts["loops"] == 1 and counts["sass_in_loops"] == 2
    assert counts["sass_in_subroutines"] == 2
    assert counts["sass_ops"] == {"S2R": 1, "IADD3": 1, "BRA": 1, "CALL": 1, "EXIT": 1, "MUFU": 1, "RET": 1}


def test_h100_roofline():
    assert H100_SXM.instructions_per_byte == pytest.approx(9.99, abs=0.01)
    # The acceptance bar: FP8-row with bf16 states, 12 bytes and 60 instructions per element,
    # sits at half the balance, memory-bound.
    at_bar = H100_SXM.roofline(bytes_per_element=12, sass_per_element=60)
    assert at_bar["bound"] == "memory" and at_bar["params_per_s"] == pytest.approx(3.35e12 / 12)
    assert H100_SXM.roofline(12, 144)["bound"] == "instruction"
    assert H100_SXM.roofline(12, 144)["params_per_s"] == pytest.approx(132 * 1.98e9 * 4 * 32 / 144)
    # torch fused AdamW with fp32 master weights: 28 bytes per parameter.
    assert H100_SXM.roofline(28, None)["params_per_s"] == pytest.approx(1.196e11, rel=1e-3)
