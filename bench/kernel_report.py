"""Static report of the optimizer's kernels on real GPU targets, compiled here without a GPU.

    python bench/kernel_report.py                      # every specialization x sm_80, sm_90, sm_100
    python bench/kernel_report.py --targets sm_90 --match '^adamw/'   # a slice, printed only
    python bench/kernel_report.py --compare OLD.json   # the committed report's steps against an older one
    python bench/kernel_report.py --bars               # the committed report's steps against the bars

For each kernel specialization of ``eco.kernels.specs.SPECS`` and each target:
registers, spills, local and shared memory, occupancy, SASS instructions per
element, HBM bytes per element, and a roofline estimate on an H100 SXM (every
target is estimated on the H100 model: the SASS differs per target, the
machine does not). Row-wise and tensor-wise formats take two launches per
step (an absmax pass, then the storing pass); the "steps" section adds the two.
The full run writes ``bench/results/kernel_report.json`` (after each target, sm_90 first).

These are static estimates, not measurements: instruction counts are every
SASS instruction of the kernel (slow-path subroutines of IEEE div/sqrt left
out), as if each executed once per program; memory time assumes the full
HBM bandwidth. A GPU run has the last word.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import triton

from eco.kernels.specs import SPECS, format_tag, states_tag
from eco_bench.aot import (
    H100_SXM,
    STREAM_ARGS,
    TARGETS,
    build_for_spec,
    bytes_per_element,
    compile_jobs,
    elements_per_thread,
    elements_per_thread_per_iteration,
)

RESULT = Path(__file__).parent / "results" / "kernel_report.json"
KERNEL_SOURCES = ("eco_step.py", "moments.py", "e4m3.py", "specs.py")
# torch.optim.AdamW(fused=True) with fp32 master weights: read g 2, master 4, m 4, v 4;
# write master 4, m 4, v 4, bf16 weight 2 (the kernel module docstring counts the same).
TORCH_FUSED_ADAMW_BYTES = 28.0


def kernel_source_digest() -> str:
    """sha256 of the kernel sources the report was compiled from (to tell a stale report)."""
    root = Path(__file__).resolve().parent.parent / "kernels"
    return hashlib.sha256(b"".join((root / name).read_bytes() for name in KERNEL_SOURCES)).hexdigest()[:16]


def _dtype(d) -> str | None:
    return None if d is None else str(d).replace("torch.", "")


def record(spec, compiled) -> dict:
    meta = spec.meta
    row = {
        "kernel": spec.name,
        "function": spec.fn.fn.__name__ if hasattr(spec.fn, "fn") else spec.fn.__name__,
        "target": compiled.target,
        "kind": meta["kernel"],
        "optimizer": meta.get("optimizer"),
        "format": format_tag(meta["format"]) if meta.get("format") else None,
        "rounding": meta.get("rounding"),
        "states": states_tag(meta["states"]) if meta.get("states") else None,
        "grad_dtype": _dtype(meta.get("grad_dtype")),
        "master": meta.get("master"),
        "pass": meta.get("pass"),
        "num_warps": spec.num_warps,
        "elements_per_thread": elements_per_thread(spec),
        "error": compiled.error,
    }
    if compiled.error:
        return row
    sass = compiled.sass_per_element(elements_per_thread(spec), elements_per_thread_per_iteration(spec))
    nbytes = bytes_per_element(spec, compiled)
    # a launch without per-element traffic (the factored finalize: per row and column) has no roofline
    roof = H100_SXM.roofline(nbytes, sass) if nbytes else {"instructions_per_byte": None, "params_per_s": None,
                                                            "bound": None}
    row.update(
        registers=compiled.registers,
        spill_bytes=compiled.spill_bytes,
        local_bytes=compiled.local_bytes,
        stack_bytes=compiled.stack_bytes,
        shared_bytes=compiled.shared_bytes,
        occupancy_warps=compiled.occupancy_warps,
        sass_total=compiled.sass_total,
        sass_in_subroutines=compiled.sass_in_subroutines,
        sass_per_element=round(sass, 2),
        bytes_per_element=round(nbytes, 4),
        instructions_per_byte=roof["instructions_per_byte"] and round(roof["instructions_per_byte"], 2),
        params_per_s=roof["params_per_s"] and round(roof["params_per_s"]),
        bound=roof["bound"],
        stream_access_bits={a: sorted(compiled.access_bits(a)) for a in STREAM_ARGS if a in compiled.accesses},
    )
    return row


def steps(records: list[dict]) -> list[dict]:
    """One row per optimizer step variant and target: the absmax pass (if any), the storing pass and, for a
    factored second moment, its statistics (the finalize launch works per row and column, not per element)."""
    absmax, stats = {}, {}
    for r in records:
        if r["error"]:
            continue
        if r["kind"] == "step" and r["pass"] == 0:
            absmax[(r["optimizer"], r["format"], r["states"], r["grad_dtype"], r["master"], r["target"])] = r
        if r["kind"] == "factored_stats" and not r["kernel"].endswith("/ragged"):  # a large weight's rows align
            stats[(r["grad_dtype"], r["target"])] = r
    out = []
    for r in records:
        if r["kind"] != "step" or r["pass"] != 1 or r["error"]:
            continue
        first = absmax.get((r["optimizer"], r["format"], r["states"], r["grad_dtype"], r["master"], r["target"]))
        launches = [first, r] if first else [r]
        if r["states"].endswith("factored"):
            launches.append(stats[(r["grad_dtype"], r["target"])])
        sass = sum(x["sass_per_element"] for x in launches)
        nbytes = sum(x["bytes_per_element"] for x in launches)
        roof = H100_SXM.roofline(nbytes, sass)
        out.append({
            "step": r["kernel"], "target": r["target"], "optimizer": r["optimizer"], "format": r["format"],
            "rounding": r["rounding"], "states": r["states"], "grad_dtype": r["grad_dtype"],
            "master": r["master"], "launches": len(launches), "sass_per_element": round(sass, 2),
            "bytes_per_element": round(nbytes, 4), "instructions_per_byte": round(sass / nbytes, 2),
            "params_per_s": round(roof["params_per_s"]), "bound": roof["bound"],
            # the acceptance bar: at most half the machine's instructions-per-byte balance
            "within_half_balance": sass / nbytes <= H100_SXM.instructions_per_byte / 2,
            "meets_throughput_bar": meets_throughput_bar(roof),
        })
    return out


def torch_fused_adamw_rate() -> float:
    """Parameters per second of torch's fused AdamW on fp32 weights and states on the roofline (memory only)."""
    return H100_SXM.roofline(TORCH_FUSED_ADAMW_BYTES, None)["params_per_s"]


def meets_throughput_bar(roof: dict) -> bool:
    """Memory-bound, or no slower than torch's fused AdamW with fp32 weights and states (the optimizer a user
    swaps out). A step that moves a quarter of the bytes (8-bit states) may spend more instructions per byte and
    still be faster than the memory-bound steps; what a user sees is parameters per second."""
    return roof["bound"] == "memory" or roof["params_per_s"] >= torch_fused_adamw_rate()


def print_bars(step_rows: list[dict], target: str = "sm_90") -> None:
    """Per optimizer and state formats on ``target``: how many steps are memory-bound, within half the
    balance, and meet the throughput bar, and the lowest estimated throughput."""
    rows = [r for r in step_rows if r["target"] == target]
    print(f"{target} steps by optimizer and states: memory-bound / within half the balance / memory-bound or at "
          f"least torch fused AdamW's {torch_fused_adamw_rate() / 1e9:.1f} Gparam/s; lowest Gparam/s")
    for optimizer, states in sorted({(r["optimizer"], r["states"]) for r in rows}):
        group = [r for r in rows if (r["optimizer"], r["states"]) == (optimizer, states)]
        counts = [sum(1 for r in group if test(r)) for test in (
            lambda r: r["bound"] == "memory", lambda r: r["within_half_balance"],
            lambda r: meets_throughput_bar(r))]
        print(f"  {optimizer + ', ' + states:24} {len(group):4} steps: {counts[0]:4} / {counts[1]:4} / {counts[2]:4};"
              f" lowest {min(r['params_per_s'] for r in group) / 1e9:6.1f}")


def print_steps(rows: list[dict]) -> None:
    header = f"{'step (H100 SXM roofline)':58} {'tgt':6} {'launch':>6} {'SASS/el':>8} {'B/el':>6} {'instr/B':>7} " \
             f"{'Gparam/s':>9} {'bound':>11} {'<=half':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['step']:58} {r['target']:6} {r['launches']:>6} {r['sass_per_element']:8.1f} "
              f"{r['bytes_per_element']:6.2f} {r['instructions_per_byte']:7.2f} {r['params_per_s'] / 1e9:9.1f} "
              f"{r['bound']:>11} {'yes' if r['within_half_balance'] else 'NO':>6}")
    torch_rate = torch_fused_adamw_rate()
    print(f"{'torch fused AdamW, fp32 master (memory only)':58} {'sm_90':6} {'':>6} {'n/a':>8} "
          f"{TORCH_FUSED_ADAMW_BYTES:6.2f} {'n/a':>7} {torch_rate / 1e9:9.1f} {'memory':>11}")


def print_launches(records: list[dict]) -> None:
    header = f"{'kernel':58} {'tgt':6} {'regs':>4} {'spill':>5} {'local':>5} {'smem':>5} {'occ':>3} " \
             f"{'SASS/el':>8} {'B/el':>6} {'Gparam/s':>9} {'bound':>11}"
    print(header)
    print("-" * len(header))
    for r in records:
        if r["error"]:
            print(f"{r['kernel']:58} {r['target']:6} FAILED: {r['error'].splitlines()[-1][:80]}")
            continue
        print(f"{r['kernel']:58} {r['target']:6} {r['registers']:4} {r['spill_bytes']:5} {r['local_bytes']:5} "
              f"{r['shared_bytes']:5} {r['occupancy_warps']:3} {r['sass_per_element']:8.1f} "
              f"{r['bytes_per_element']:6.2f} {(r['params_per_s'] or 0) / 1e9:9.1f} {r['bound'] or 'n/a':>11}")


def _step_key(row: dict) -> tuple:
    """A step's variant without its rounding; reports from before the state formats name ``state_dtype``."""
    states = row.get("states") or {"float32": "fp32", "bfloat16": "bf16"}[row["state_dtype"]]
    return row["target"], row["optimizer"], row["format"], states, row["grad_dtype"], row["master"]


def rounding_costs(steps: list[dict]) -> dict:
    """``{step key: (nearest, stochastic)}`` SASS per element of the steps that have both roundings."""
    by_rounding = {}
    for r in steps:
        by_rounding.setdefault(_step_key(r), {})[r["rounding"]] = r["sass_per_element"]
    return {k: (v["nearest"], v["stochastic"]) for k, v in by_rounding.items() if len(v) == 2}


def compare(old: dict, new: dict, target: str = "sm_90") -> None:
    """Print, per optimizer and state formats on ``target``, the median SASS per element of the steps both
    reports have, by rounding, and what stochastic rounding adds over round-to-nearest (the weight's random
    numbers; the states' own stochastic rounding is in both roundings' counts)."""
    before, after = rounding_costs(old["steps"]), rounding_costs(new["steps"])
    common = sorted(k for k in before.keys() & after.keys() if k[0] == target)
    print(f"{target}: median SASS/element over the {len(common)} steps (format x grad dtype x master) of both "
          f"reports; SR cost = stochastic - nearest")
    header = f"{'optimizer, states':22} {'steps':>5}  {'nearest old/new':>16}  {'stochastic old/new':>19}  " \
             f"{'SR cost old/new':>16}"
    print(header)
    print("-" * len(header))
    for optimizer, states in sorted({(k[1], k[3]) for k in common}):
        keys = [k for k in common if (k[1], k[3]) == (optimizer, states)]

        def median(report, i, keys=keys):
            return statistics.median(report[k][i] for k in keys)

        def cost(report, keys=keys):
            return statistics.median(report[k][1] - report[k][0] for k in keys)

        print(f"{optimizer + ', ' + states:22} {len(keys):5}  {median(before, 0):7.1f} {median(after, 0):8.1f}  "
              f"{median(before, 1):9.1f} {median(after, 1):9.1f}  {cost(before):7.1f} {cost(after):8.1f}")
    print(f"old: kernel sources {old['kernel_source_sha256']}, new: {new['kernel_source_sha256']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--match", default=None, help="only specializations whose name matches this regex")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--launches", action="store_true", help="also print one row per launch")
    parser.add_argument("--bars", action="store_true",
                        help="compile nothing: print the committed report's steps against the bars")
    parser.add_argument("--compare", metavar="OLD_JSON", default=None,
                        help="compile nothing: compare the steps of the committed report with OLD_JSON's "
                             "(e.g. git show REV:bench/results/kernel_report.json > OLD_JSON)")
    args = parser.parse_args(argv)
    if args.bars:
        print_bars(json.loads(RESULT.read_text())["steps"])
        return 0
    if args.compare:
        compare(json.loads(Path(args.compare).read_text()), json.loads(RESULT.read_text()))
        return 0

    specs = [s for s in SPECS if args.match is None or re.search(args.match, s.name)]
    full = args.match is None and args.targets == list(TARGETS)
    # A full run compiles one target after the other (sm_90, the roofline's machine, first) and writes the
    # report after each, so a run stopped part way keeps what it compiled ("targets" says which).
    rounds = sorted(args.targets, key=lambda t: t != "sm_90") if full else [None]
    records, seconds = [], 0.0
    for target in rounds:
        jobs = [(s, t) for s in specs for t in ([target] if target else args.targets)]
        started = time.perf_counter()
        compiled = compile_jobs([(build_for_spec(s, t), t) for s, t in jobs], workers=args.workers)
        seconds += time.perf_counter() - started
        records += [record(s, c) for (s, _), c in zip(jobs, compiled, strict=True)]
        if full:
            write_report(records, seconds, rounds[:rounds.index(target) + 1])
    step_rows = steps(records)

    if args.launches:
        print_launches(records)
        print()
    print_steps([r for r in step_rows if r["target"] == "sm_90"] or step_rows)
    failed = [r for r in records if r["error"]]
    spilled = [r for r in records if not r["error"] and (r["spill_bytes"] or r["local_bytes"])]
    adamw_90 = [r for r in step_rows if r["optimizer"] == "adamw" and r["target"] == "sm_90"]
    print(f"\n{len(records)} launches compiled in {seconds:.0f} s ({len(failed)} failed, {len(spilled)} spill "
          f"or use local memory); H100 balance {H100_SXM.instructions_per_byte:.2f} instr/byte.")
    if adamw_90:
        missing = [r for r in adamw_90 if not r["within_half_balance"]]
        print(f"sm_90 AdamW steps within half the balance: {len(adamw_90) - len(missing)} of {len(adamw_90)}.")
        print_bars(step_rows)
    if full:
        print(f"wrote {RESULT}")
    return 1 if failed or spilled else 0


def write_report(records: list[dict], seconds: float, targets: list[str]) -> None:
    """Write ``bench/results/kernel_report.json`` with the records of ``targets``."""
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "triton_version": triton.__version__,
        "command": "python bench/kernel_report.py",
        "targets": targets,
        "compile_seconds": round(seconds),
        "kernel_source_sha256": kernel_source_digest(),
        "machine": {"name": H100_SXM.name, "hbm_bytes_per_s": H100_SXM.hbm_bytes_per_s, "sms": H100_SXM.sms,
                    "clock_hz": H100_SXM.clock_hz,
                    "warp_instructions_per_clock_per_sm": H100_SXM.warp_instructions_per_clock_per_sm,
                    "instructions_per_byte": H100_SXM.instructions_per_byte},
        "note": "static estimates from the compiled code, not GPU measurements",
        "torch_fused_adamw_fp32_master": {"bytes_per_element": TORCH_FUSED_ADAMW_BYTES, "bound": "memory",
                                          "params_per_s": round(torch_fused_adamw_rate())},
        "records": records,
        "steps": steps(records),
    }, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
