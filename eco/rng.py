"""The one random stream of stochastic rounding: a counter-based hash of (seed, element index).

Every backend (the eager reference, the compiled CPU path, the Triton kernels)
evaluates the same function, so stochastic steps are bit-identical across
them, and across any split of a tensor into pieces or shards:

    x    = (index * stride + low32(seed)) mod 2**32     stride = (seed >> 32) | 1 (odd)
    h    = lowbias32(x)                                  (C. Wellons' 32-bit integer hash)
    u    = (h >> 8) * 2**-24                             fp32 uniform in [0, 1), 24 bits
    bits = h >> 16                                       16 random bits (bf16 stochastic rounding)

``index`` is the element's row-major flat index in the LOGICAL (unsharded)
tensor, taken mod 2**32. A piece or shard whose first element has global index
``offset`` evaluates ``x = i * stride + base`` for its local indices ``i``
with ``base = (offset * stride + low32(seed)) mod 2**32``, computed on the
host (:func:`key`): the same ``x`` as the whole tensor gives that element.
All arithmetic is on 32-bit integers (int32 that wrap, with logical shifts),
which inductor vectorizes and Triton runs natively.

Seeds: the optimizer draws one seed in [0, 2**62) per tensor per step.
Each stored tensor rounds with its own stream (:func:`stream_seeds`): the
weight with the drawn seed itself, the first moment and the second moment
with seeds derived from it on the host (splitmix64), so the three never share
random numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

WEIGHT, MOMENTUM, SECOND_MOMENT = 0, 1, 2
SEED_LIMIT = 1 << 62

# lowbias32's multipliers as int32 (the second one has the sign bit set).
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B - (1 << 32)
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _as_int32(x: int) -> int:
    """The int32 whose 32 bits are ``x mod 2**32``."""
    x &= _MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def stream_seeds(seed: int) -> tuple[int, int, int]:
    """The seeds of the weight, first-moment and second-moment streams of one tensor's step."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"a stochastic-rounding seed is an int in [0, 2**62), got {seed}")
    return seed, _splitmix64(seed, MOMENTUM), _splitmix64(seed, SECOND_MOMENT)


def _splitmix64(seed: int, stream: int) -> int:
    z = (seed + stream * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 2


class StreamKey(NamedTuple):
    """``stride`` and ``base`` of a stream at a piece's first element, as 0-d int32 tensors.

    Tensors, not Python ints: a compiled step takes a new key each step as an
    input instead of recompiling for it.
    """

    stride: torch.Tensor
    base: torch.Tensor


def key(seed: int, offset: int = 0) -> StreamKey:
    """The key of stream ``seed`` for a piece whose first element has global flat index ``offset``."""
    stride = (seed >> 32) | 1
    base = offset * stride + seed
    return StreamKey(torch.tensor(_as_int32(stride), dtype=torch.int32),
                     torch.tensor(_as_int32(base), dtype=torch.int32))


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >>> bits`` on the 32 bits of an int32 tensor."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hash_bits(k: StreamKey, shape, device=None) -> torch.Tensor:
    """The 32-bit hash ``h`` (as int32) of every element of a piece of this ``shape``, in row-major order."""
    numel = 1
    for n in shape:
        numel *= n
    index = torch.arange(numel, dtype=torch.int32, device=device).reshape(shape)
    x = index * k.stride.to(device) + k.base.to(device)
    x = x ^ _shift_right_logical(x, 16)
    x = x * _HASH_MUL1
    x = x ^ _shift_right_logical(x, 15)
    x = x * _HASH_MUL2
    return x ^ _shift_right_logical(x, 16)


def uniform(k: StreamKey, shape, device=None) -> torch.Tensor:
    """fp32 uniforms in [0, 1) (24 bits) for a piece of this ``shape``."""
    return _shift_right_logical(hash_bits(k, shape, device), 8).to(torch.float32) * (1.0 / 16777216.0)


def bits16(k: StreamKey, shape, device=None) -> torch.Tensor:
    """16 random bits (int32 in [0, 2**16)) for a piece of this ``shape``: the top half of the hash."""
    return _shift_right_logical(hash_bits(k, shape, device), 16)


__all__ = ["StreamKey", "key", "stream_seeds", "hash_bits", "uniform", "bits16", "WEIGHT", "MOMENTUM",
           "SECOND_MOMENT", "SEED_LIMIT"]
