"""Final validation loss of ECO-SR with each optimizer-state format, beside the fp32 master-weight baseline.

The byte-level LM of ``bench/memory_loss.py`` (same data, schedule, clipping and
evaluation); one arm per (m format, v format), each seed its own initial
weights and data order shared by every arm. Used to choose the 8-bit m format
(int8 or E4M3) and the default state formats.

    python bench/state_formats.py --format fp8 --seeds 2 --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from eco_bench import memory_loss as benchmark

STATES = ["fp32/fp32", "bf16/bf16", "int8/fp32", "fp8/fp32", "int8/factored", "fp8/factored", "int8/fp8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="fp8", choices=("fp8", "int4"))
    parser.add_argument("--states", nargs="*", default=STATES)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for every run's result")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = benchmark.BenchConfig(steps=args.steps, warmup=max(1, args.steps // 10), d_model=args.d_model,
                                n_layers=args.layers, eval_every=max(1, args.steps // 4), eval_batches=2,
                                final_eval_batches=16, format=args.format, progress=False, threads=1)
    train, val, _ = benchmark.load_corpus(cfg.data)
    results = []
    with tempfile.TemporaryDirectory() as data_dir:
        np.save(Path(data_dir) / "train.npy", train)
        np.save(Path(data_dir) / "val.npy", val)
        for states in ["master", *args.states]:
            arm = states if states == "master" else benchmark.STATE_ARM_PREFIX + states
            benchmark.check_state_arm(arm)
            for seed in range(args.seeds):
                run = benchmark.run_arm(arm, seed, dict(cfg.__dict__), data_dir)
                run["arm"] = states
                results.append({k: run[k] for k in ("arm", "seed", "final_val_loss", "diverged",
                                                    "skipped_steps", "static_bytes_per_param", "wall_s")})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"format {args.format}, {args.steps} steps, d_model {args.d_model}, {args.layers} layers, "
          f"{args.seeds} seeds")
    print("| states (m/v) | bytes/param | final val loss (mean over seeds) | vs master |")
    print("|---|---:|---:|---:|")
    base = statistics.mean(r["final_val_loss"] for r in results if r["arm"] == "master")
    for arm in ["master", *args.states]:
        runs = [r for r in results if r["arm"] == arm]
        loss = statistics.mean(r["final_val_loss"] for r in runs)
        spread = " ".join(f"{r['final_val_loss']:.4f}" for r in runs)
        print(f"| {arm} | {runs[0]['static_bytes_per_param']:.2f} | {loss:.4f} ({spread}) | "
              f"{100 * (loss / base - 1):+.2f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
