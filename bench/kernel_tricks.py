"""What each instruction-saving trick would buy the ECO AdamW step, compiled for sm_90 without a GPU.

    python bench/kernel_tricks.py

Copies ``kernels/eco_step.py`` and ``kernels/e4m3.py`` to a temporary
package, applies one text patch per variant (failing loudly if the patched
text is not found, so a stale patch never measures the unpatched kernel),
compiles the FP8 AdamW specializations with bf16 states for sm_90 and prints
SASS instructions per element beside the bar (half the H100 balance times
the bytes per element). Some variants change the numerics (approximate
division and square root, FMA contraction, fewer Philox rounds): they break
the bit-identity with ``eco.reference`` under round-to-nearest and would
need the reference (or the tests' tolerance) to change with them. This is a
static estimate, not a measurement; see bench/kernel_report.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from eco.kernels import SPECS
from eco.kernels.aot import H100_SXM, build_for_spec, bytes_per_element, compile_jobs, elements_per_thread

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SPEC_NAMES = (
    "adamw/fp8-block32/nearest/state-bf16/grad-bf16",
    "adamw/fp8-block32/stochastic/state-bf16/grad-bf16",
    "adamw/fp8-row/absmax-pass/state-bf16/grad-bf16",
    "adamw/fp8-row/nearest/state-bf16/grad-bf16",
    "adamw/fp8-row/stochastic/state-bf16/grad-bf16",
)
_RANDINT = "tl.randint(seed, offsets)"
# variant -> list of (file, old text, new text); "fma" is an option, not a patch
PATCHES = {
    "approximate division (m / d)": [("eco_step.py", "tl.math.div_rn(m_tilde, d)", "(m_tilde / d)")],
    "approximate sqrt": [("eco_step.py", "tl.math.sqrt_rn(v_new * inv_bc2)", "tl.sqrt(v_new * inv_bc2)")],
    "hardware bf16 store (cvt.rn)": [("eco_step.py", "tl.store(ptr + offsets, to_bf16_rne(value), mask=mask)",
                                      "tl.store(ptr + offsets, value.to(tl.bfloat16), mask=mask)")],
    "Philox 10 -> 4 rounds": [("eco_step.py", _RANDINT, "tl.randint(seed, offsets, 4)")],
    "one randint4x per 4 elements": [("eco_step.py", _RANDINT, "_shared_randint(seed, offsets)")],
    "SR: random low bits on the fp32 pattern": [
        ("eco_step.py", "grid = e4m3.round_stochastic(y, u)",
         "grid = _round_stochastic_bits(y, tl.randint(seed, offsets))")
    ],
    "E4M3 decode as (bits << 20) * 2**120": [("eco_step.py", "e4m3.decode(", "_decode_by_multiply(")],
    "hardware FP8 cvt (sm_89+, not A100)": [
        ("eco_step.py", "code = e4m3.encode_nearest(grid)", "code = _hw_encode(grid)"),
        ("eco_step.py", "e4m3.decode(", "_hw_decode("),
    ],
}
SHARED_RANDINT = '''

@triton.jit
def _round_stochastic_bits(y, r):
    """Add random bits below the kept mantissa bits of |y|, then truncate (unbiased for |y| >= 2**-9)."""
    bits = y.to(tl.int32, bitcast=True)
    mag_bits = bits & 0x7FFFFFFF
    drop = tl.minimum(20 + tl.maximum(121 - (mag_bits >> 23), 0), 23)
    noise = (r >> (32 - drop)).to(tl.int32)
    rounded = ((mag_bits + noise) >> drop) << drop
    out = tl.minimum(rounded.to(tl.float32, bitcast=True), 448.0)
    return tl.where(bits < 0, -out, out)


@triton.jit
def _decode_by_multiply(byte):
    """E4M3 -> fp32 for every non-NaN code: the 7 magnitude bits placed as fp32 exponent/mantissa bits are
    the value times 2**-120 (fp32 subnormals included), so one exact multiplication rescales them."""
    b = byte.to(tl.int32) & 0xFF
    mag = ((b & 0x7F) << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36
    return (mag.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _hw_encode(x):
    return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def _hw_decode(byte):
    return byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _shared_randint(seed, offsets):
    """One Philox call per 4 consecutive elements (the compiler shares it within a thread)."""
    r0, r1, r2, r3 = tl.randint4x(seed, offsets // 4)
    k = offsets % 4
    return tl.where(k == 0, r0, tl.where(k == 1, r1, tl.where(k == 2, r2, r3)))
'''


def make_variant(root: Path, name: str, patches) -> str:
    """Write a patched copy of the kernel modules as package ``name`` under ``root``."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(KERNELS / "e4m3.py", package / "e4m3.py")
    source = (KERNELS / "eco_step.py").read_text()
    for file, old, new in patches:
        assert file == "eco_step.py"
        count = source.count(old)
        if count == 0:
            raise SystemExit(f"variant {name!r}: {old!r} not found in kernels/eco_step.py; update the patch")
        source = source.replace(old, new)
    (package / "eco_step.py").write_text(source + SHARED_RANDINT)
    return name


def main() -> int:
    specs = [next(s for s in SPECS if s.name == n) for n in SPEC_NAMES]
    variants = {"baseline (as committed)": ([], {})}
    variants.update({label: (patches, {}) for label, patches in PATCHES.items()})
    variants["FMA contraction (enable_fp_fusion)"] = ([], {"enable_fp_fusion": True})
    # SR bits before sharing the randint (the sharing patch rewrites every randint call)
    order = ["approximate division (m / d)", "approximate sqrt", "hardware bf16 store (cvt.rn)",
             "SR: random low bits on the fp32 pattern", "one randint4x per 4 elements",
             "E4M3 decode as (bits << 20) * 2**120"]
    combined = [p for label in order for p in PATCHES[label]]
    exact = [p for label in order[2:] for p in PATCHES[label]]  # RNE codes stay bit-identical to the reference
    variants["bit-exact ones: bf16 cvt, SR, decode"] = (exact, {})
    variants["all but Philox rounds and hw FP8 (+FMA)"] = (combined, {"enable_fp_fusion": True})
    hardware = [p for p in combined if p not in PATCHES["E4M3 decode as (bits << 20) * 2**120"]]
    variants["... hardware FP8 cvt instead (sm_89+)"] = (hardware + PATCHES["hardware FP8 cvt (sm_89+, not A100)"],
                                                         {"enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PYTHONPATH"] = tmp + os.pathsep + os.environ.get("PYTHONPATH", "")
        jobs, keys = [], []
        for i, (label, (patches, options)) in enumerate(variants.items()):
            package = make_variant(Path(tmp), f"eco_variant_{i}", patches)
            for spec in specs:
                base = build_for_spec(spec)
                build = dataclasses.replace(base, kernel=f"{package}.eco_step:eco_step_kernel",
                                            path=str(Path(tmp) / package / "eco_step.py"),
                                            options={**base.options, **options})
                jobs.append((build, "sm_90"))
                keys.append((label, spec))
        results = compile_jobs(jobs)
    print(f"{'variant':38} " + " ".join(f"{n.split('/')[1] + '/' + n.split('/')[2]:>22}" for n in SPEC_NAMES))
    table = {}
    for (label, spec), result in zip(keys, results, strict=True):
        if result.error:
            table[(label, spec.name)] = "FAILED"
            continue
        sass = result.sass_per_element(elements_per_thread(spec))
        bar = H100_SXM.instructions_per_byte / 2 * bytes_per_element(spec, result)
        table[(label, spec.name)] = f"{sass:6.1f} (bar {bar:4.1f})"
    for label in variants:
        print(f"{label:38} " + " ".join(f"{table[(label, n)]:>22}" for n in SPEC_NAMES))
    print("\nSASS instructions per element on sm_90; bar = half the H100 balance x this launch's bytes per element.")
    print("Row-wise FP8 takes both the absmax pass and the storing pass: add the two columns, and the two bars.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
