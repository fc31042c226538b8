"""The step works in pieces (issue 15): the same bits whatever the piece size, and bounded temporary memory."""

import pytest
import torch

import eco
from eco import compiled, reference, states
from tests import step_memory
from tests.helpers import FORMATS, assert_bits_equal

ADAM = dict(lr=0.02, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)
SGD = dict(lr=0.05, momentum=0.9, weight_decay=0.01)


def _run(backend, optimizer, fmt, shape, m_name, v_name, piece_elements, monkeypatch):
    """Two steps of one weight with ``PIECE_ELEMENTS = piece_elements``; every stored tensor, flattened."""
    monkeypatch.setattr(reference, "PIECE_ELEMENTS", piece_elements)
    gen = torch.Generator().manual_seed(0)
    codes, scales = fmt.quantize(torch.randn(shape, generator=gen))
    m_fmt = states.for_shape(states.momentum_format(m_name), shape)
    m = reference.Moment(m_fmt, m_fmt.allocate(shape, "cpu"))
    out = [codes, scales]
    for step in (1, 2):
        grad = torch.randn(shape, generator=gen)
        if optimizer == "adamw":
            if step == 1:
                v_fmt = states.for_shape(states.second_moment_format(v_name), shape)
                v = reference.Moment(v_fmt, v_fmt.allocate(shape, "cpu"))
            backend.adamw_step_(codes, scales, grad, m, v, None, fmt=fmt, shape=shape,
                                scalars=reference.adamw_scalars(step=step, **ADAM), rounding="stochastic",
                                seed=step)
        else:
            backend.sgd_step_(codes, scales, grad, m, None, fmt=fmt, shape=shape,
                              scalars=reference.sgd_scalars(**SGD), rounding="stochastic", seed=step)
    return out + list(m.tensors) + (list(v.tensors) if optimizer == "adamw" else [])


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("optimizer, m_name, v_name", [("adamw", "int8", "factored"), ("adamw", "bf16", "fp8"),
                                                       ("sgd", "fp8", None)])
def test_any_piece_size_gives_the_same_bits(name, optimizer, m_name, v_name, monkeypatch):
    """Whole tensor, whole matrices, rows inside a matrix (tensor-wise INT4: two passes), one row at a time."""
    fmt = FORMATS[name]
    shape = torch.Size((3, 5, 64))
    results = [_run(reference, optimizer, fmt, shape, m_name, v_name, n, monkeypatch) for n in (1 << 18, 320, 128, 1)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert_bits_equal(b, a, f"{fmt} {m_name}/{v_name}")


def test_pieces_give_the_same_bits_compiled_and_for_plain_parameters(monkeypatch):
    fmt = eco.INT4()
    shape = torch.Size((2, 6, 32))
    whole = _run(compiled, "adamw", fmt, shape, "int8", "factored", 1 << 18, monkeypatch)
    split = _run(compiled, "adamw", fmt, shape, "int8", "factored", 64, monkeypatch)
    for a, b in zip(whole, split, strict=True):
        assert_bits_equal(b, a, "compiled, split tensor-wise INT4")
    results = []
    for piece_elements in (1 << 18, 256):  # a 1-D tensor of 4 state blocks, stepped one block at a time
        monkeypatch.setattr(reference, "PIECE_ELEMENTS", piece_elements)
        gen = torch.Generator().manual_seed(1)
        p, g = torch.randn(512, generator=gen), torch.randn(512, generator=gen)
        m = reference.Moment(states.INT8_STATE, states.INT8_STATE.allocate(p.shape, "cpu"))
        v = reference.Moment(states.BF16_STATE, states.BF16_STATE.allocate(p.shape, "cpu"))
        reference.plain_adamw_step_(p, g, m, v, scalars=reference.adamw_scalars(step=1, **ADAM), seed=4)
        results.append([p, *m.tensors, *v.tensors])
    for a, b in zip(*results, strict=True):
        assert_bits_equal(b, a, "plain 1-D")


def test_pieces_hold_whole_rows_and_never_straddle_a_matrix(monkeypatch):
    lay = reference.layout((4, 10, 300))
    assert lay == reference.Layout(rows=40, cols=300, matrix_rows=10, matrices=4)
    inside = [(m + r, m + min(r + 4, 10)) for m in range(0, 40, 10) for r in (0, 4, 8)]
    for piece_elements, expected in ((1 << 18, [(0, 40)]), (6000, [(0, 20), (20, 40)]), (1200, inside)):
        monkeypatch.setattr(reference, "PIECE_ELEMENTS", piece_elements)
        assert reference.pieces(lay) == expected, piece_elements
    assert reference.layout((1024,)) == reference.Layout(8, 128, 8, 1)  # 1-D: rows of one state block
    assert reference.layout((100,)) == reference.Layout(1, 100, 1, 1)
    assert reference.pieces(reference.layout((0, 64))) == []  # an empty shard


MIB = 1 << 20


@pytest.mark.parametrize("fmt, momentum, second_moment", [("fp8-row", "bf16", "bf16"),
                                                          ("int4-tensor", "int8", "factored")])
def test_step_temporaries_stay_under_64_mib_whatever_the_tensor_size(fmt, momentum, second_moment):
    """Issue 15's bar on the default CPU path: one [8, 1024, 2048] expert tensor's step needs at most 64 MiB
    beyond the tensors that exist anyway (was about 950 MB), and a tensor 8x smaller needs about as much."""
    big = step_memory.measure((8, 1024, 2048), fmt, momentum, second_moment)["step_temporary_bytes"]
    small = step_memory.measure((1, 1024, 2048), fmt, momentum, second_moment)["step_temporary_bytes"]
    assert big <= 64 * MIB, big / MIB
    assert big <= small + 4 * MIB, (big / MIB, small / MIB)
