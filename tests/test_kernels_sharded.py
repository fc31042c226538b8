"""A dim-0 shard's step through the kernels equals the unsharded step (issue 17), every bit.

Each shard (a thread here, a rank under FSDP) steps its rows with ``offset``
(the global index of its first element), ``full_shape`` and ``reduce`` (an
all-reduce across the shards); the kernels draw each element's random numbers
by its global index and all-reduce what a matrix split across shards needs
(tensor-wise absmax, max |g| and the factored sums), in the reference's
order. The shards' results, put together, must be the unsharded result; a
shard with no rows still takes part in every reduce.

Triton's interpreter patches its language module while a kernel runs, so the
threads take turns for each launch; they run concurrently between launches,
which is where they meet in ``reduce``.
"""

from __future__ import annotations

import threading

import pytest
import torch

import eco
from eco import kernels, reference, states
from eco.kernels import launcher
from eco.reference import Moment
from tests.test_kernels import ADAM, DEVICE, assert_states_equal, clone_state, random_moment, to_device

SPLITS = [(0, 3), (3, 7), (7, 7)]  # the last shard is empty


class AllReduce:
    """``reduce(tensor, op)`` for each of ``n`` threads: max or sum over them, in place."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=600)
        self.slots: list = [None] * n
        self.calls: list = [[] for _ in range(n)]

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor, op: str) -> None:
            self.calls[rank].append((op, tuple(t.shape), t.dtype))
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            result = stacked.amax(0) if op == "max" else stacked.sum(0)
            self.barrier.wait()  # every rank has read the others' values
            t.copy_(result)
        return reduce


@pytest.fixture
def one_launch_at_a_time(monkeypatch):
    lock = threading.Lock()
    real = launcher.launch

    def launch(spec, grid, **args):
        with lock:
            real(spec, grid, **args)

    monkeypatch.setattr(launcher, "launch", launch)


def shard_rows(x, r0, r1, replicated=False):
    """A shard's own copy (a fresh allocation, as FSDP gives each rank) of rows ``[r0, r1)`` of ``x`` (dim 0);
    ``replicated``: all of it. A factored second moment of a matrix keeps its column and mean EMAs whole."""
    if isinstance(x, Moment):
        per_matrix = isinstance(x.fmt, states.Factored) and x.tensors[0].dim() == 1
        return Moment(x.fmt, tuple(t.clone() if per_matrix and i > 0 else t[r0:r1].clone()
                                   for i, t in enumerate(x.tensors)))
    return x.clone() if replicated else x[r0:r1].clone()


def run_shards(step, n):
    """Run ``step(rank, reduce)`` for every shard in its own thread; re-raise the first failure."""
    group = AllReduce(n)
    errors = []

    def body(rank):
        try:
            step(rank, group.for_rank(rank))
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return group


CASES = [(eco.INT4(), ("int8", "factored")), (eco.FP8(), ("bf16", "bf16")), (eco.INT4(group_size=32), ("int8", "fp8")),
         (eco.FP8(group_size=64), ("int8", "factored")), (None, ("int8", "factored"))]


def _batched(single):
    """``single`` (a shard's one-tensor step) through the batched function the optimizer calls, the shard given as
    the per-tensor ``offsets``/``full_shapes``/``reduces`` lists."""
    def step(*args, seed, offset, reduce, full_shape, **kwargs):
        if single is kernels.plain_adamw_step_:
            kernels.plain_adamw_steps_(*([a] for a in args), seeds=[seed], offsets=[offset], full_shapes=[full_shape],
                                       reduces=[reduce], **kwargs)
        else:
            shape = kwargs.pop("shape")
            kernels.adamw_steps_(*([a] for a in args), shapes=[shape], seeds=[seed], offsets=[offset],
                                 full_shapes=[full_shape], reduces=[reduce], **kwargs)
    return step


ENTRIES = [(case, "single") for case in CASES] + [(CASES[0], "batched"), (CASES[-1], "batched")]


@pytest.mark.parametrize("fmt, pair, entry", [(*case, entry) for case, entry in ENTRIES],
                         ids=[f"{f or 'plain'}-{p[0]}-{p[1]}-{e}" for (f, p), e in ENTRIES])
def test_sharded_step_equals_the_unsharded_step(fmt, pair, entry, one_launch_at_a_time):
    """A 7 x 256 matrix on three shards (3, 4 and 0 rows), two stochastic AdamW steps: codes, scales and every
    state bit-identical to one unsharded step; each shard calls reduce in the reference's order. ``batched``: the
    shards through the batched ``*_steps_`` with per-tensor shard lists (the optimizer's entry point)."""
    shape = (7, 256)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    if fmt is None:
        weight, scales = w.to(DEVICE), None
    else:
        weight, scales = (t.to(DEVICE) for t in fmt.quantize(w))
    m = to_device(random_moment(pair[0], "m", shape, gen, 0.01))
    v = to_device(random_moment(pair[1], "v", shape, gen, 1e-3))
    whole = dict(weight=weight, scales=scales, m=m, v=v) if fmt is not None else dict(weight=weight, m=m, v=v)
    tensorwise = fmt is not None and fmt.tensorwise
    shards = [{k: shard_rows(x, r0, r1, replicated=(k == "scales" and tensorwise)) for k, x in whole.items()}
              for r0, r1 in SPLITS]
    for step in (1, 2):
        grad = (torch.randn(shape, generator=gen) * 0.1).to(DEVICE)
        scalars = reference.adamw_scalars(step=step, **ADAM)
        seed = 2**50 + step
        if fmt is None:
            reference.plain_adamw_step_(whole["weight"], grad, whole["m"], whole["v"], scalars=scalars, seed=seed)
        else:
            reference.adamw_step_(whole["weight"], whole["scales"], grad, whole["m"], whole["v"], None, fmt=fmt,
                                  shape=torch.Size(shape), scalars=scalars, rounding="stochastic", seed=seed)

        def shard_step(rank, reduce, grad=grad, scalars=scalars, seed=seed):
            r0, r1 = SPLITS[rank]
            s = shards[rank]
            extra = dict(seed=seed, offset=r0 * shape[1], reduce=reduce, full_shape=shape)
            if fmt is None:
                single = kernels.plain_adamw_step_
                step_fn = single if entry == "single" else _batched(single)
                step_fn(s["weight"], grad[r0:r1].clone(), s["m"], s["v"], scalars=scalars, **extra)
            else:
                single = kernels.adamw_step_
                step_fn = single if entry == "single" else _batched(single)
                step_fn(s["weight"], s["scales"], grad[r0:r1].clone(), s["m"], s["v"], None, fmt=fmt,
                        shape=torch.Size((r1 - r0, shape[1])), scalars=scalars, rounding="stochastic", **extra)

        group = run_shards(shard_step, len(SPLITS))
        expected_calls = ([("max", (1,), torch.float32)] if pair[1] == "factored" else [])
        expected_calls += [("max", (1, 1), torch.float32)] if tensorwise else []
        expected_calls += ([("sum", (1, shape[1]), torch.int64), ("sum", (1,), torch.int64)]
                           if pair[1] == "factored" else [])
        assert group.calls == [expected_calls] * len(SPLITS)
        for rank, (r0, r1) in enumerate(SPLITS):
            expected = {k: shard_rows(x, r0, r1, replicated=(k == "scales" and tensorwise)) for k, x in whole.items()}
            assert_states_equal(shards[rank], expected)


def test_expert_shards_hold_whole_matrices_and_reduce_nothing(one_launch_at_a_time):
    """A [4, 8, 128] expert tensor on shards of 1, 3 and 0 experts (``reduce`` None, as FSDP passes for 3-D
    tensors): with ``offset`` alone the shards' steps are the unsharded step."""
    fmt = eco.INT4()
    shape = (4, 8, 128)
    gen = torch.Generator().manual_seed(1)
    codes, scales = (t.to(DEVICE) for t in fmt.quantize(torch.randn(shape, generator=gen)))
    state = dict(codes=codes, scales=scales, m=to_device(random_moment("int8", "m", shape, gen, 0.01)),
                 v=to_device(random_moment("factored", "v", shape, gen, 1e-3)))
    grad = (torch.randn(shape, generator=gen) * 0.1).to(DEVICE)
    scalars = reference.adamw_scalars(step=3, **ADAM)
    whole = clone_state(state)
    reference.adamw_step_(whole["codes"], whole["scales"], grad, whole["m"], whole["v"], None, fmt=fmt,
                          shape=torch.Size(shape), scalars=scalars, rounding="stochastic", seed=11)
    for e0, e1 in ((0, 1), (1, 4), (4, 4)):  # the last shard holds no experts
        part = {k: shard_rows(x, e0, e1) for k, x in state.items()}
        kernels.adamw_step_(part["codes"], part["scales"], grad[e0:e1].clone(), part["m"], part["v"], None, fmt=fmt,
                            shape=torch.Size((e1 - e0, *shape[1:])), scalars=scalars, rounding="stochastic", seed=11,
                            offset=e0 * 8 * 128, full_shape=shape)
        assert_states_equal(part, {k: shard_rows(x, e0, e1) for k, x in whole.items()})
