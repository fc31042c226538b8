"""Compile kernels for real GPU targets (sm_80, sm_90, sm_100) without a GPU.

The first half checks the machinery of ``eco_bench.aot`` on small kernels
of this file whose compiled form is known (a copy kernel is 128-bit with
alignment hints and 32-bit without; a kernel holding 256 floats per thread
spills). The second half compiles the specializations the optimizer launches
(``eco.kernels`` list) for the three targets and asserts: it compiles, it does
not spill, it uses no local memory, and its big streams use 128-bit accesses.
Which specializations (:func:`_spec_matrix`): by default the CI matrix
(:func:`ci_specs`: every step variant that matters for registers and accesses,
a third of the list), ``ECO_AOT_FULL=1`` every one, ``ECO_AOT_SUBSET=1`` a
quick covering subset (:func:`covering_specs`).

Compilation runs in one child process per group (the tests run under the
interpreter, whose kernels cannot be compiled); results are cached per module.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import triton
import triton.language as tl

from eco import formats as eco_formats
from eco_bench.aot import (
    H100_SXM,
    STREAM_ARGS,
    TARGETS,
    KernelBuild,
    build_for_spec,
    bytes_per_element,
    compile_jobs,
    count_sass,
    stream_element_bits,
    widest_access_bits,
)


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


def test_sass_counting_of_loops_slow_paths_padding_and_the_trap_branch():
    sass = """
        /*0000*/                   S2R R0, SR_TID.X ;
    .L_x_0:
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
        /*0030*/             @!P1 BRA `(.L_x_3) ;
        /*0040*/                   MOV R20, 0x60 ;
        /*0050*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
    .L_x_3:
        /*0060*/                   EXIT ;
    $__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
        /*0070*/                   MUFU.RCP R1, R0 ;
        /*0080*/                   RET.REL.NODEC R20 `(kernel) ;
    .L_x_1:
        /*0090*/                   BRA `(.L_x_1);
        /*00a0*/                   NOP;
    """
    counts = count_sass(sass)
    assert counts["sass_total"] == 9  # all but the NOP and the trap BRA
    assert counts["loops"] == 1 and counts["sass_in_loops"] == 2  # IADD3 and its BRA
    assert counts["sass_in_subroutines"] == 4  # the call site (MOV, CALL) and the subroutine (MUFU, RET)
    assert counts["sass_ops"] == {"S2R": 1, "IADD3": 1, "BRA": 2, "MOV": 1, "CALL": 1, "EXIT": 1, "MUFU": 1, "RET": 1}


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


# --------------------------------------------------------------------------- the optimizer's kernels
def covering_specs(specs) -> list:
    """A subset of the kernel list that every axis value and every step variant appears in.

    Every (kernel function, optimizer, format kind, rounding, pass) combination
    once, with bf16 states and gradients where that exists; then every value of
    each remaining axis (state dtype, gradient dtype, master copy, group size,
    output dtype, aligned rows) at least once per kernel function. ``ECO_AOT_SUBSET=1``
    compiles only this subset (a quick check while editing a kernel).
    """

    def axis_values(spec):
        m = spec.meta
        fmt = m.get("format") or {}
        return {
            "states": m.get("states"),
            "grad_dtype": m.get("grad_dtype"),
            "master": m.get("master"),
            "group_size": fmt.get("group_size"),
            "out_dtype": m.get("out_dtype"),
            "rows_aligned": m.get("rows_aligned"),
        }

    def preference(spec):  # bf16 first, no master, group size 32 first
        values = axis_values(spec)
        return (values["states"] not in (None, ("bf16", "bf16"), ("bf16", None)),
                values["grad_dtype"] not in (None, torch.bfloat16), bool(values["master"]), values["group_size"] or 0,
                spec.name)

    chosen = {}
    for spec in sorted(specs, key=preference):
        m = spec.meta
        fmt = m.get("format") or {}
        kind = (fmt.get("name"), fmt.get("group_size") is None) if fmt else None
        chosen.setdefault((m["kernel"], m.get("optimizer"), kind, m.get("rounding"), m.get("pass")), spec)
    seen = {(s.meta["kernel"], axis, value) for s in chosen.values() for axis, value in axis_values(s).items()}
    for spec in specs:
        for axis, value in axis_values(spec).items():
            if (spec.meta["kernel"], axis, value) not in seen:
                chosen[spec.name] = spec
                seen |= {(spec.meta["kernel"], a, v) for a, v in axis_values(spec).items()}
    return sorted(chosen.values(), key=lambda s: s.name)


def _family(fmt: dict | None):
    """A weight format's family: ``("fp8", True)`` for row-wise FP8 (two passes), ``("int4", False)`` for INT4
    groups; None for a plain parameter."""
    return (fmt["name"], fmt["group_size"] is None) if fmt else None


def _variant(spec) -> tuple:
    """What a step specialization's registers and accesses depend on, but for the group size and the gradient
    dtype: kernel, optimizer, state pair, master copy, format family, pass and rounding."""
    m = spec.meta
    return (m["kernel"], m["optimizer"], m["states"], m["master"], _family(m["format"]), m["pass"], m["rounding"])


def ci_specs(specs) -> list:
    """The default matrix: every specialization of the kernels other than the steps, and of the steps
    (``"step"``, ``"step_multi"``) every :func:`_variant` once, the group size and gradient dtype rotating
    among the variants (so each appears with many pairs). About a third of the full list: the full one
    (``ECO_AOT_FULL=1``) adds only other group sizes and gradient dtypes of the same variants."""
    chosen, variants = [], {}
    for spec in specs:
        if spec.meta["kernel"] in ("step", "step_multi"):
            variants.setdefault(_variant(spec), []).append(spec)
        else:
            chosen.append(spec)
    for i, key in enumerate(sorted(variants, key=repr)):
        group = sorted(variants[key], key=lambda s: s.name)
        chosen.append(group[i % len(group)])
    return sorted(chosen, key=lambda s: s.name)


def _spec_matrix():
    """The specializations compiled: :func:`ci_specs` by default, every one under ``ECO_AOT_FULL=1``, the quick
    covering subset under ``ECO_AOT_SUBSET=1``."""
    from eco.kernels.specs import SPECS

    if os.environ.get("ECO_AOT_FULL") == "1":
        return SPECS
    return covering_specs(SPECS) if os.environ.get("ECO_AOT_SUBSET") == "1" else ci_specs(SPECS)


@pytest.fixture(scope="module")
def spec_results():
    """``{(spec name, target): CompiledKernel}`` for the matrix, compiled once (no SASS: not asserted here)."""
    specs = _spec_matrix()
    jobs = [(build_for_spec(s, t), t) for s in specs for t in TARGETS]
    started = time.perf_counter()
    compiled = compile_jobs(jobs, sass=False)
    print(f"\ncompiled {len(jobs)} kernels ({len(specs)} specializations x {len(TARGETS)} targets) "
          f"in {time.perf_counter() - started:.0f} s")
    return {(s.name, t): c for (s, t), c in zip([(s, t) for s in specs for t in TARGETS], compiled, strict=True)}


def test_the_matrix_covers_every_axis():
    from eco.kernels.specs import SPECS

    subset = covering_specs(SPECS)
    kinds = {(s.meta["kernel"], s.meta.get("optimizer"), s.meta.get("rounding"), s.meta.get("pass")) for s in SPECS}
    assert {(s.meta["kernel"], s.meta.get("optimizer"), s.meta.get("rounding"), s.meta.get("pass"))
            for s in subset} == kinds
    assert {s.fn for s in subset} == {s.fn for s in SPECS}
    assert len(subset) < len(SPECS)


def test_the_ci_matrix_covers_every_step_variant_group_size_and_gradient_dtype():
    """Every kernel other than the steps; every step variant (state pair, master copy, format family, pass,
    rounding); and per step kernel and optimizer every group size and gradient dtype, each with several pairs."""
    from eco.kernels.specs import SPECS

    matrix = ci_specs(SPECS)
    steps = [s for s in SPECS if s.meta["kernel"] in ("step", "step_multi")]
    assert {s.name for s in SPECS if s not in steps} <= {s.name for s in matrix}
    assert {_variant(s) for s in matrix if s in steps} == {_variant(s) for s in steps}
    for axis in ("grad_dtype", "group_size"):
        def value(s, axis=axis):
            return s.meta["grad_dtype"] if axis == "grad_dtype" else (s.meta["format"] or {}).get("group_size")

        for key in {(s.meta["kernel"], s.meta["optimizer"]) for s in steps}:
            wanted = {value(s) for s in steps if (s.meta["kernel"], s.meta["optimizer"]) == key}
            pairs = {}
            for s in matrix:
                if s in steps and (s.meta["kernel"], s.meta["optimizer"]) == key:
                    pairs.setdefault(value(s), set()).add(s.meta["states"])
            assert set(pairs) == wanted, (key, axis)
            assert all(len(p) >= 2 for p in pairs.values()) or len(wanted) == 1, (key, axis, pairs)
    assert len(matrix) < len(SPECS) / 2


def _params():
    """``(name, target)`` of every specialization of the matrix."""
    try:
        specs = _spec_matrix()
    except ImportError:  # the kernel list is not importable: the test reports it
        return [pytest.param("<eco.kernels.specs.SPECS missing>", t) for t in TARGETS]
    return [pytest.param(spec.name, t, id=f"{spec.name}-{t}") for spec in specs for t in TARGETS]


def _spec(name):
    from eco.kernels.specs import SPECS

    return next(s for s in SPECS if s.name == name)


@pytest.mark.parametrize("name,target", _params())
def test_specialization_compiles_without_spills(spec_results, name, target):
    result = spec_results[(name, target)]
    assert result.error is None, f"{name} does not compile for {target}:\n{result.error}"
    assert result.spill_bytes == 0, f"{name} on {target} spills {result.spill_bytes} bytes"
    assert result.local_bytes == 0 and result.stack_bytes == 0


@pytest.mark.parametrize("name,target", _params())
def test_big_streams_use_the_widest_vector_access(spec_results, name, target):
    """128-bit accesses on grad, m, v (codes: as wide as a thread's share of bytes allows). The factored
    statistics' ragged variant (rows of any length, so no row is known to be aligned) reads one element per
    access; the launcher takes it only when some row is not a multiple of 16 elements."""
    spec = _spec(name)
    result = spec_results[(name, target)]
    streams = [a for a in STREAM_ARGS if a in result.accesses]
    if spec.meta["kernel"] == "factored_finalize":  # per row and column of a factored second moment, not per element
        assert not streams, f"{name} reads per-element streams: {streams}"
        return
    assert streams, f"{name}: no per-element stream is accessed"
    def possible(arg):
        if spec.meta.get("rows_aligned") is False:
            return stream_element_bits(spec, arg)
        return widest_access_bits(spec, arg)

    narrow = {arg: (sorted(result.access_bits(arg)), possible(arg)) for arg in streams
              if result.access_bits(arg) != {possible(arg)}}
    assert not narrow, f"{name} on {target}: (bits used, bits possible) per stream: {narrow}"


def test_bytes_per_element_match_the_traffic_model(spec_results):
    """The traffic the compiled code moves equals ``eco.kernels.traffic``'s model of each launch (whose sums are
    the bytes table of its docstring)."""
    from eco.formats import format_from_config
    from eco.kernels import traffic

    shape = (4096, 4096)
    checked = set()
    for (name, target), result in spec_results.items():
        spec = _spec(name)
        m = spec.meta
        if target != "sm_90" or result.error or m["master"]:
            continue
        if m["kernel"] == "factored_stats":
            expected = traffic.launch_bytes(eco_formats.INT4(), shape, grad_dtype=m["grad_dtype"], launch="stats")
        elif m["kernel"] == "step" and m["format"] is not None:
            expected = traffic.launch_bytes(format_from_config(m["format"]), shape, optimizer=m["optimizer"],
                                            states=m["states"], grad_dtype=m["grad_dtype"],
                                            launch="absmax" if m["pass"] == 0 else "step")
        else:
            continue
        # abs 0.01: the compiled side counts per-row/column parts (row scales, a factored v) as zero
        assert bytes_per_element(spec, result) == pytest.approx(expected / 4096**2, abs=0.01), name
        checked.add(m["kernel"])
    assert checked == {"step", "factored_stats"}


def test_hardware_fp8_conversion_only_where_the_target_has_it():
    """sm_90 encodes/decodes E4M3 with F2FP conversions; sm_80 (no such instruction) keeps the bit codec.

    fp32 states and gradient: no bf16 store, so every F2FP is an FP8 conversion.
    """
    spec = _spec("adamw/fp8-block32/nearest/state-fp32/grad-fp32")
    a100, h100 = compile_jobs([(build_for_spec(spec, t), t) for t in ("sm_80", "sm_90")])
    assert a100.error is None and h100.error is None
    assert a100.sass_ops.get("F2FP", 0) == 0
    assert h100.sass_ops.get("F2FP", 0) >= 2  # at least one encode and one decode per thread
    assert spec.constexprs["TARGET"] == 0 and build_for_spec(spec, "sm_90").constexprs["TARGET"] == 90
