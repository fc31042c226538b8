"""examples/fsdp2_finetune.py under torchrun on 2 CPU processes (gloo): FSDP2-sharded INT4 experts, a DCP
checkpoint mid-run, and a fresh model and optimizer resumed from it ending bit-identical."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_finetune.py"


def test_example_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    """Stochastic rounding, the example's default (the DCP tests cover round-to-nearest), with 8-bit m and a
    factored v (the DCP tests cover fp32 states)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
               "--steps", "6", "--save-at", "3", "--log-every", "3", "--momentum", "int8",
               "--second-moment", "factored", "--checkpoint", str(tmp_path / "ckpt")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "saved a checkpoint after step 3" in done.stdout
    assert "optimizer states bit-identical" in done.stdout, done.stdout
    assert "weight codes" in done.stdout  # each rank's memory report
    print(f"torchrun example: {seconds:.1f} s")
