"""What the FSDP2/DCP/DDP tests share: running a function on several CPU processes joined by torch.distributed
(gloo), and a small model whose weights do not split evenly across ranks.

Each rank is a fresh ``spawn`` process (torch.distributed keeps global state, so no forking of the test
process) with one thread, a process group on a free local port, and a short timeout: a hang fails the
test instead of stalling CI. ``fn(rank, world_size, *args)`` must be a module-level function (pickled by
name); what it returns comes back to the test, one entry per rank.
"""

from __future__ import annotations

import datetime
import faulthandler
import io
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import eco


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, timeout, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(timeout, exit=True)  # a hang prints where each rank is stuck
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            # As bytes: torch's queues pass tensors as shared memory, gone when this process exits.
            buffer = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buffer)
            results.put((rank, True, buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the test with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each on its own process; one rank runs in
    this process (no start-up cost)."""
    if world_size == 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            return [fn(0, 1, *args)]
        finally:
            dist.destroy_process_group()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, timeout, fn, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout + 30)  # after the ranks' own tracebacks
            (out if ok else errors)[rank] = value
    except queue.Empty:
        errors["timeout"] = f"no answer from ranks {sorted(set(range(world_size)) - set(out) - set(errors))} " \
                            f"within {timeout} s"
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"--- rank {r}:\n{e}" for r, e in errors.items()))
    return [torch.load(io.BytesIO(out[r]), weights_only=False) for r in range(world_size)]


_RUNS: dict = {}


def run_ranks_once(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """:func:`run_ranks`, run once per test session for the same arguments: many tests assert on one run (process
    start-up dominates on CPU). A failed run fails every test that uses it without running again."""
    key = (fn.__module__, fn.__qualname__, world_size, args)
    if key not in _RUNS:
        try:
            _RUNS[key] = (True, run_ranks(fn, world_size, *args, timeout=timeout))
        except AssertionError as err:
            _RUNS[key] = (False, str(err))
    ok, value = _RUNS[key]
    if not ok:
        raise AssertionError(f"the shared {world_size}-rank run of {fn.__qualname__} failed:\n{value}")
    return value


# ---------------------------------------------------------------- a model for sharding
class Experts(nn.Module):
    """Fused experts ``[experts, out, in]`` indexed per expert, as transformers' MoE blocks do."""

    def __init__(self, experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return sum(F.linear(x, self.weight[e]) for e in range(self.weight.shape[0]))


class Net(nn.Module):
    """Rows not divisible by the world size: ``head`` has 5 rows, ``experts`` 3 experts (an empty shard on 4 ranks)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.inp = nn.Linear(32, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.experts = Experts(3, dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.experts(self.norm(self.inp(x)))))


def quantized_net(fmt, dim: int = 32, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return eco.quantize_(Net(dim), fmt, filter_fn=lambda name, p: p.dim() >= 2)


def shard(model: Net, **kwargs) -> Net:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.experts, **kwargs)
    fully_shard(model, **kwargs)
    return model


def inputs(rank: int) -> torch.Tensor:
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(100 + rank))


def local_rows(global_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The dim-0 rows torch.chunk gives ``rank`` (what FSDP2 shards): (start, stop)."""
    per = -(-global_rows // world_size)
    return min(rank * per, global_rows), min((rank + 1) * per, global_rows)
