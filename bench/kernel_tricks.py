"""What each instruction-saving trick would buy the ECO AdamW step, compiled for sm_90 without a GPU.

    python bench/kernel_tricks.py

Copies the kernel modules (``kernels/eco_step.py``, ``moments.py``,
``e4m3.py``) to a temporary package, applies one text patch per variant
(failing loudly if the patched text is not found, so a stale patch never
measures the unpatched kernel), compiles AdamW step specializations for sm_90
and prints SASS instructions per element beside the bar (half the H100
balance times the bytes per element). The bit-exact tricks priced by the
first version of this script (E4M3 decode by one multiplication, hardware
bf16 and, on sm_89+, E4M3 conversions, stochastic rounding on the fp32 bits)
are in the kernels now; what is left here changes the numerics (approximate
division and square root, FMA contraction): those break the bit-identity with
``eco.reference`` and would need the reference (or the tests' tolerance) to
change with them. The earlier "fewer Philox rounds" variant is gone with
Philox: the kernels draw ``eco.rng``'s stream (one lowbias32 hash of the
element's index per stream, no rounds to trim), which is the contract every
backend evaluates, so it cannot be cheapened in the kernels alone. This is a
static estimate, not a measurement; see bench/kernel_report.py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from eco.kernels.specs import SPECS
from eco_bench.aot import H100_SXM, build_for_spec, bytes_per_element, compile_jobs, elements_per_thread

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SPEC_NAMES = (
    "adamw/fp8-block32/nearest/state-bf16/grad-bf16",
    "adamw/fp8-block32/stochastic/state-bf16/grad-bf16",
    "adamw/fp8-row/absmax-pass/state-bf16/grad-bf16",
    "adamw/fp8-row/nearest/state-bf16/grad-bf16",
    "adamw/fp8-row/stochastic/state-bf16/grad-bf16",
    "adamw/int4-group32/nearest/state-bf16/grad-bf16",
    "adamw/int4-group32/stochastic/state-bf16/grad-bf16",
    "adamw/int4-group32/stochastic/state-int8-factored/grad-bf16",
)
KERNEL_FILES = ("eco_step.py", "moments.py", "e4m3.py")
# variant -> list of (file, old text, new text); "fma" is an option, not a patch
PATCHES = {
    "approximate division (m / d)": [("eco_step.py", "tl.math.div_rn(m_tilde, d)", "(m_tilde / d)")],
    "approximate sqrt": [("eco_step.py", "tl.math.sqrt_rn(tl.minimum(v_new * inv_bc2, SATURATION))",
                          "tl.sqrt(tl.minimum(v_new * inv_bc2, SATURATION))")],
}


def make_variant(root: Path, name: str, patches) -> str:
    """Write a patched copy of the kernel modules as package ``name`` under ``root``."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    sources = {file: (KERNELS / file).read_text() for file in KERNEL_FILES}
    for file, old, new in patches:
        if sources[file].count(old) == 0:
            raise SystemExit(f"variant {name!r}: {old!r} not found in kernels/{file}; update the patch")
        sources[file] = sources[file].replace(old, new)
    for file, source in sources.items():
        (package / file).write_text(source)
    return name


def main() -> int:
    specs = [next(s for s in SPECS if s.name == n) for n in SPEC_NAMES]
    variants = {"baseline (as committed)": ([], {})}
    variants.update({label: (patches, {}) for label, patches in PATCHES.items()})
    variants["FMA contraction (enable_fp_fusion)"] = ([], {"enable_fp_fusion": True})
    approximate = PATCHES["approximate division (m / d)"] + PATCHES["approximate sqrt"]
    variants["approximate div and sqrt, FMA"] = (approximate, {"enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PYTHONPATH"] = tmp + os.pathsep + os.environ.get("PYTHONPATH", "")
        jobs, keys = [], []
        for i, (label, (patches, options)) in enumerate(variants.items()):
            package = make_variant(Path(tmp), f"eco_variant_{i}", patches)
            for spec in specs:
                base = build_for_spec(spec, "sm_90")
                build = dataclasses.replace(base, kernel=f"{package}.eco_step:eco_step_kernel",
                                            path=str(Path(tmp) / package / "eco_step.py"),
                                            options={**base.options, **options})
                jobs.append((build, "sm_90"))
                keys.append((label, spec))
        results = compile_jobs(jobs)
    labels = {n: "/".join(n.split("/")[1:4]).replace("/state-", "/") for n in SPEC_NAMES}
    width = max(22, *map(len, labels.values()))
    print(f"{'variant':38} " + " ".join(f"{labels[n]:>{width}}" for n in SPEC_NAMES))
    table = {}
    for (label, spec), result in zip(keys, results, strict=True):
        if result.error:
            table[(label, spec.name)] = "FAILED"
            continue
        sass = result.sass_per_element(elements_per_thread(spec))
        bar = H100_SXM.instructions_per_byte / 2 * bytes_per_element(spec, result)
        table[(label, spec.name)] = f"{sass:6.1f} (bar {bar:4.1f})"
    for label in variants:
        print(f"{label:38} " + " ".join(f"{table[(label, n)]:>{width}}" for n in SPEC_NAMES))
    print("\nSASS instructions per element on sm_90; bar = half the H100 balance x this launch's bytes per element.")
    print("Row-wise FP8 takes both the absmax pass and the storing pass: add the two columns, and the two bars.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
