"""A seeded permutation of range(n) computed one index at a time, never held in memory.

A balanced Feistel network permutes the 2h-bit numbers, 4^h the smallest such domain that holds
n: x is split into halves (left, right) of h bits and each round maps them to (right, left xor
F(right)), F a keyed 64-bit mix cut to h bits; whatever F is, each round can be undone, so the
network is a bijection of [0, 4^h). Indices past n are walked on (Black and Rogaway's
cycle-walking, 2002): from i < n the network is applied again until it lands below n. The walk
follows i's cycle, which holds i itself, so it ends; and it sends [0, n) onto itself one to one.
The domain is below 4n, so a walk takes fewer than 4 steps on average. Memory and time per index
do not depend on n: a 500M-sample epoch costs what a 500-sample one does, and nothing is built
before the first index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 6  # Feistel rounds: 4 already make a random-looking permutation (Luby and Rackoff)
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers whose every output bit depends on
    every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """p[i], i in range(n): a permutation of range(n) drawn from `key` (non-negative ints, such
    as (seed, dataset, epoch)), a pure function of (key, n, i) computed in O(1) memory."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation of range({n})")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits of each half: 4^half >= n
        self.mask = (1 << self.half) - 1
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)
        self.round_keys = [int(k) for k in state]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._network(int(i))
        while x >= self.n:
            x = self._network(x)
        return x

    def _network(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right
