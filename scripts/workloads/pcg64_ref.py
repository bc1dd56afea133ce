"""Pure-Python reference of numpy's `default_rng(seed)` bit stream.

numpy.random.default_rng(seed) == Generator(PCG64(SeedSequence(seed))).  The
workload streams in this folder consume ONLY the raw 64-bit outputs of that
bit generator (`bit_generator.random_raw()`), through the two derived
primitives below (`uniform01`, `bounded`), so a re-implementation (Rust) needs
exactly this file's logic and nothing else from numpy.  `self_test()` checks
this reference against the installed numpy bit for bit.

All arithmetic is on unsigned integers with the stated wrap-around.
"""

from __future__ import annotations

M32 = 0xFFFF_FFFF
M64 = 0xFFFF_FFFF_FFFF_FFFF
M128 = (1 << 128) - 1

# numpy/random/bit_generator.pyx (SeedSequence), pool_size = 4
INIT_A = 0x43B0D7E5
MULT_A = 0x931E8875
INIT_B = 0x8B51F9DD
MULT_B = 0x58F38DED
MIX_MULT_L = 0xCA01F9DD
MIX_MULT_R = 0x4973F715
XSHIFT = 16
POOL_SIZE = 4

# PCG64 (XSL-RR 128/64), numpy/random/src/pcg64
PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645


def seed_words(seed: int) -> list[int]:
    """Entropy words of an integer seed: little-endian 32-bit limbs, [0] for 0."""
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if seed == 0:
        return [0]
    out = []
    while seed:
        out.append(seed & M32)
        seed >>= 32
    return out


def seedseq_pool(seed: int) -> list[int]:
    entropy = seed_words(seed)
    hc = INIT_A

    def hashmix(value: int) -> int:
        nonlocal hc
        value = (value ^ hc) & M32
        hc = (hc * MULT_A) & M32
        value = (value * hc) & M32
        return value ^ (value >> XSHIFT)

    def mix(x: int, y: int) -> int:
        r = (MIX_MULT_L * x - MIX_MULT_R * y) & M32
        return r ^ (r >> XSHIFT)

    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(POOL_SIZE)]
    for i_src in range(POOL_SIZE):
        for i_dst in range(POOL_SIZE):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(POOL_SIZE, len(entropy)):
        for i_dst in range(POOL_SIZE):
            pool[i_dst] = mix(pool[i_dst], hashmix(entropy[i_src]))
    return pool


def seedseq_generate_state_u64(seed: int, n_words64: int) -> list[int]:
    pool = seedseq_pool(seed)
    hc = INIT_B
    w32 = []
    for i in range(2 * n_words64):
        v = pool[i % POOL_SIZE]
        v = (v ^ hc) & M32
        hc = (hc * MULT_B) & M32
        v = (v * hc) & M32
        v ^= v >> XSHIFT
        w32.append(v)
    return [w32[2 * k] | (w32[2 * k + 1] << 32) for k in range(n_words64)]


class Pcg64Ref:
    """PCG64 seeded like numpy's PCG64(SeedSequence(seed))."""

    def __init__(self, seed: int):
        s = seedseq_generate_state_u64(seed, 4)
        initstate = (s[0] << 64) | s[1]
        initseq = (s[2] << 64) | s[3]
        self.inc = ((initseq << 1) | 1) & M128
        self.state = 0
        self._step()
        self.state = (self.state + initstate) & M128
        self._step()

    def _step(self) -> None:
        self.state = (self.state * PCG_MULT + self.inc) & M128

    def next_u64(self) -> int:
        self._step()  # advance first, then output the NEW state
        hi, lo = self.state >> 64, self.state & M64
        x = hi ^ lo
        rot = hi >> 58
        return ((x >> rot) | (x << ((64 - rot) & 63))) & M64


class NumpyRaw:
    """The same stream taken from numpy (fast path used by the scripts)."""

    def __init__(self, seed: int):
        import numpy as np
        self._bg = np.random.default_rng(seed).bit_generator
        self._buf: list[int] = []

    def next_u64(self) -> int:
        if not self._buf:
            self._buf = [int(v) for v in self._bg.random_raw(4096)][::-1]
        return self._buf.pop()


def uniform01(rng) -> float:
    """Double in [0,1): top 53 bits of one raw draw (== numpy Generator.random())."""
    return (rng.next_u64() >> 11) * (1.0 / 9007199254740992.0)


def bounded(rng, n: int) -> int:
    """Unbiased integer in [0, n), 1 <= n < 2**64: Lemire's multiply-shift with rejection.

    m = x * n (128-bit); lo = m mod 2**64; if lo < n: t = (2**64 - n) mod n, and
    redraw x while lo < t; return m >> 64.  (Not numpy's own `integers`, whose
    algorithm differs by dtype; this one is specified here so it is portable.)
    """
    if not 1 <= n <= M64:
        raise ValueError("bounded: n out of range")
    m = rng.next_u64() * n
    lo = m & M64
    if lo < n:
        t = ((1 << 64) - n) % n
        while lo < t:
            m = rng.next_u64() * n
            lo = m & M64
    return m >> 64


def fisher_yates(rng, items: list[int]) -> list[int]:
    """In-place shuffle: for i = len-1 down to 1: j = bounded(i+1); swap(i, j)."""
    for i in range(len(items) - 1, 0, -1):
        j = bounded(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def self_test(seeds=(0, 1, 2, 12345, 2**32 - 1, 2**32, 2**64 + 7), n: int = 1000) -> None:
    import numpy as np
    for seed in seeds:
        ss = np.random.SeedSequence(seed).generate_state(4, np.uint64)
        assert [int(v) for v in ss] == seedseq_generate_state_u64(seed, 4), f"SeedSequence({seed})"
        ref, npr = Pcg64Ref(seed), NumpyRaw(seed)
        for i in range(n):
            a, b = ref.next_u64(), npr.next_u64()
            assert a == b, f"seed {seed} draw {i}: {a:#x} != {b:#x}"
        g1, r2 = np.random.default_rng(seed), Pcg64Ref(seed)
        assert [float(v) for v in g1.random(100)] == [uniform01(r2) for _ in range(100)], \
            f"uniform01 != Generator.random for seed {seed}"


if __name__ == "__main__":
    self_test()
    r = Pcg64Ref(1)
    print("self-test OK; seed 1 state words:",
          [hex(v) for v in seedseq_generate_state_u64(1, 4)],
          "first raw:", [hex(r.next_u64()) for _ in range(4)])
