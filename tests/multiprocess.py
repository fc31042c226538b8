"""Run a function on several CPU processes joined by torch.distributed (gloo), for the FSDP2/DCP/DDP tests.

Each rank is a fresh ``spawn`` process (torch.distributed keeps global state, so no forking of the test
process) with one thread, a process group on a free local port, and a short timeout: a hang fails the
test instead of stalling CI. ``fn(rank, world_size, *args)`` must be a module-level function (pickled by
name); what it returns comes back to the test, one entry per rank.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, timeout, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the test with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each on its own process."""
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
            rank, ok, value = results.get(timeout=timeout)
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
    return [out[r] for r in range(world_size)]
