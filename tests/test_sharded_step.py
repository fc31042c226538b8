"""A dim-0 shard stepped with ``offset``/``full_shape``/``reduce`` gives the unsharded step's bits (fsdp's seam).

The shards run in threads of one process; ``reduce`` is a barrier-based
all-reduce among them, so the collective calls must come in the same number
and order on every shard, an empty shard included.
"""

import threading

import pytest
import torch

import eco
from eco import reference, states
from tests.helpers import FORMATS, assert_bits_equal

ADAM = dict(lr=0.02, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)


class FakeGroup:
    """An all-reduce among ``n`` threads (max or sum), in place."""

    def __init__(self, n):
        self.barrier = threading.Barrier(n)
        self.lock = threading.Lock()
        self.slots = []

    def reduce(self, tensor, op):
        with self.lock:
            self.slots.append(tensor.clone())
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0)
        self.barrier.wait()
        with self.lock:
            self.slots.clear()
        self.barrier.wait()
        tensor.copy_(result)


def make(fmt, shape, m_name, v_name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes, scales = fmt.quantize(torch.randn(shape, generator=gen))
    m_fmt, v_fmt = (states.for_shape(f, shape) for f in (states.momentum_format(m_name),
                                                          states.second_moment_format(v_name)))
    return dict(codes=codes, scales=scales, grad=torch.randn(shape, generator=gen),
                m=reference.Moment(m_fmt, m_fmt.allocate(shape, "cpu")),
                v=reference.Moment(v_fmt, v_fmt.allocate(shape, "cpu")))


def shard(t, rows, r0, r1, fmt=None, part=None):
    """Rows [r0, r1) of a per-row tensor (codes, grad, m, row-local states); per-matrix parts are whole copies."""
    if part in states.replicated_parts(states.FACTORED_STATE, (rows, 1)) or (
            fmt is not None and fmt.tensorwise and part == "scales"):
        return t.clone()
    return t.view(rows, -1)[r0:r1].clone().reshape(r1 - r0, *t.shape[1:]) if t.dim() else t.clone()


@pytest.mark.parametrize("name", ["fp8-row", "int4-tensor", "int4-group32"])
@pytest.mark.parametrize("m_name, v_name", [("int8", "factored"), ("bf16", "fp8")])
def test_row_shards_of_a_matrix_give_the_unsharded_bits(name, m_name, v_name, monkeypatch):
    fmt = FORMATS[name]
    shape = torch.Size((10, 64))
    bounds = [(0, 4), (4, 7), (7, 10), (10, 10)]  # uneven, and an empty shard (FSDP pads short tensors)
    monkeypatch.setattr(reference, "PIECE_ELEMENTS", 64 * 2)  # several pieces per shard too
    whole = make(fmt, shape, m_name, v_name)
    shards = []
    for r0, r1 in bounds:
        sh = {k: shard(whole[k], 10, r0, r1, fmt, "scales" if k == "scales" else None)
              for k in ("codes", "scales", "grad")}
        for k in ("m", "v"):
            mo = whole[k]
            sh[k] = reference.Moment(mo.fmt, tuple(
                shard(t, 10, r0, r1, part=suffix) for t, suffix in zip(mo.tensors, mo.fmt.parts, strict=True)))
        shards.append(sh)
    group = FakeGroup(len(bounds))
    errors = []

    def run(sh, r0, r1, step, seed):
        try:
            reference.adamw_step_(sh["codes"], sh["scales"], sh["grad"], sh["m"], sh["v"], None, fmt=fmt,
                                  shape=torch.Size((r1 - r0, 64)), scalars=reference.adamw_scalars(step=step, **ADAM),
                                  rounding="stochastic", seed=seed, offset=r0 * 64, full_shape=shape,
                                  reduce=group.reduce)
        except Exception as exc:  # surfaced below; a hung barrier would otherwise hide it
            errors.append(exc)
            group.barrier.abort()

    for step, seed in ((1, 5), (2, 6)):
        reference.adamw_step_(whole["codes"], whole["scales"], whole["grad"], whole["m"], whole["v"], None, fmt=fmt,
                              shape=shape, scalars=reference.adamw_scalars(step=step, **ADAM), rounding="stochastic",
                              seed=seed)
        threads = [threading.Thread(target=run, args=(sh, r0, r1, step, seed)) for sh, (r0, r1) in zip(shards, bounds,
                                                                                                        strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for sh, (r0, r1) in zip(shards, bounds, strict=True):
            pairs = [(sh["codes"], whole["codes"], None), (sh["scales"], whole["scales"], "scales")]
            pairs += [(t, w, suffix) for k in ("m", "v")
                      for t, w, suffix in zip(sh[k].tensors, whole[k].tensors, whole[k].fmt.parts, strict=True)]
            for t, w, part in pairs:
                if part in states.replicated_parts(whole["v"].fmt, shape) or (part == "scales" and fmt.tensorwise):
                    expected = w
                else:
                    expected = w.view(10, -1)[r0:r1]
                assert_bits_equal(t.reshape(expected.shape), expected, f"step {step} shard {r0} {part}")


def test_expert_shards_hold_whole_matrices_and_reduce_nothing():
    fmt = eco.INT4()
    shape = torch.Size((4, 6, 32))
    whole = make(fmt, shape, "fp32", "factored")
    scalars = reference.adamw_scalars(step=1, **ADAM)
    part = {k: whole[k][2:4].clone() for k in ("codes", "scales", "grad")}  # experts 2 and 3
    m, v = (reference.Moment(whole[k].fmt, tuple(t[2:4].clone() for t in whole[k].tensors)) for k in ("m", "v"))
    reference.adamw_step_(whole["codes"], whole["scales"], whole["grad"], whole["m"], whole["v"], None, fmt=fmt,
                          shape=shape, scalars=scalars, rounding="stochastic", seed=9)
    calls = []
    reference.adamw_step_(part["codes"], part["scales"], part["grad"], m, v, None, fmt=fmt,
                          shape=torch.Size((2, 6, 32)), scalars=scalars, rounding="stochastic", seed=9,
                          offset=2 * 6 * 32, full_shape=shape, reduce=lambda t, op: calls.append(op))
    assert calls == []
    assert_bits_equal(part["codes"], whole["codes"][2:4], "codes")
    assert_bits_equal(part["scales"], whole["scales"][2:4], "scales")
    for a, b in zip(v.tensors, whole["v"].tensors, strict=True):
        assert_bits_equal(a, b[2:4], "factored v")
