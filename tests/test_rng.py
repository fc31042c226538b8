"""The counter-based random stream of stochastic rounding (``eco.rng``)."""

import numpy as np
import pytest
import torch

from eco import rng


def _lowbias32_uniform(seed: int, numel: int, offset: int = 0) -> np.ndarray:
    """rng.uniform written independently, in numpy uint32 arithmetic (wrapping by definition)."""
    with np.errstate(over="ignore"):
        index = (np.arange(numel, dtype=np.uint64) + np.uint64(offset)).astype(np.uint32)
        x = index * np.uint32((seed >> 32) | 1) + np.uint32(seed & 0xFFFFFFFF)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 123456789123, ((2**30 - 1) << 32) + 3_000_000_000]


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_uniform_is_the_lowbias32_hash_bit_for_bit(how):
    """The int32 implementation wraps exactly like uint32 arithmetic, eager and compiled, for seeds whose
    low word has the sign bit set, and at offsets past 2**32 (a shard of a huge tensor)."""
    shape = (7, 4099)

    def fn(key, shape):
        return rng.uniform(key, shape)

    if how == "compiled":  # the shape is a constant of the graph, the key an input
        fn = torch.compile(lambda key, _: rng.uniform(key, shape), dynamic=False, fullgraph=True)
    for seed in SEEDS:
        for offset in (0, 5, 2**31 + 3, 3 * 2**32 + 17):
            expected = torch.from_numpy(_lowbias32_uniform(seed, 7 * 4099, offset)).reshape(shape)
            assert torch.equal(fn(rng.key(seed, offset), shape), expected), (seed, offset)


def test_a_piece_at_an_offset_draws_what_the_whole_tensor_draws_there():
    whole = rng.uniform(rng.key(99), (10, 64))
    for r0, r1 in ((0, 3), (3, 4), (4, 10)):
        assert torch.equal(rng.uniform(rng.key(99, r0 * 64), (r1 - r0, 64)), whole[r0:r1])


def test_uniform_is_uniform_and_independent_across_seeds_neighbours_and_streams():
    n = 1 << 16
    u = rng.uniform(rng.key(123456789123), (n,))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov: sup |F_n - F| < 1.63 / sqrt(n) at the 1% level.
    sorted_u, _ = u.double().sort()
    expected = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (sorted_u - expected).abs().max() < 1.63 / n**0.5
    others = [rng.uniform(rng.key(123456789124), (n,))]
    others += [rng.uniform(rng.key(s), (n,)) for s in rng.stream_seeds(123456789123)[1:]]
    for a, b in [(u[:-1], u[1:])] + [(u, o) for o in others]:
        r = torch.corrcoef(torch.stack((a, b)).double())[0, 1]
        assert abs(r) < 4 / n**0.5
    assert torch.equal(u, rng.uniform(rng.key(123456789123), (n,)))  # reproducible


def test_stream_seeds_are_distinct_and_in_range():
    for seed in SEEDS:
        w, m, v = rng.stream_seeds(seed)
        assert w == seed and len({w, m, v}) == 3
        assert all(0 <= s < 2**62 for s in (w, m, v))
    with pytest.raises(ValueError, match="seed"):
        rng.stream_seeds(2**62)


def test_bits16_are_the_top_half_of_the_hash():
    key = rng.key(7, 3)
    h = rng.hash_bits(key, (5, 9)).numpy().view(np.uint32)
    assert np.array_equal(rng.bits16(key, (5, 9)).numpy(), (h >> 16).astype(np.int32))
    u = rng.uniform(key, (5, 9)).numpy()
    assert np.array_equal(u, (h >> 8).astype(np.float32) * np.float32(2.0**-24))
