"""numba kernels for the histogram fold (imported only when numba is installed).

One branch-free pass per value: |x|, zero count, NaN flag, the bin index ``int(|x| * scale)``
(float32 multiply, truncation, clipped to the last bin, exactly as the numpy path computes it), and
an increment into one of four interleaved count tables (so that runs of one bin, e.g. ReLU zeros,
do not serialise on one counter). The main loop is unrolled by four (measured 25% faster than one
loop indexed ``i & 3``); the tail takes table 0.
"""
from __future__ import annotations


def compile(numba):  # noqa: A001 - the module's one entry point
    import numpy as np

    njit = numba.njit(cache=True, nogil=True, boundscheck=False)
    inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
    inf = np.inf
    zero = np.float32(0.0)

    @inline
    def index(v, scale, top):
        return min(max(int(v * scale), 0), top)

    @inline
    def count(v, scale, counts, j):
        """Count |x| = ``v`` into table ``j``; (is it zero, is it NaN or infinite)."""
        counts[j, index(v, scale, counts.shape[1] - 1)] += 1
        return v == 0, not (v < inf)

    @inline
    def count_both(y, scale, counts, relu_scale, relu_counts, j):
        v, r = abs(y), y if y > zero else zero  # r float32, as np.maximum(x, 0) gives
        counts[j, index(v, scale, counts.shape[1] - 1)] += 1
        relu_counts[j, index(r, relu_scale, relu_counts.shape[1] - 1)] += 1
        return v == 0, r == 0, not (v < inf)

    @njit
    def abs_counts(x, scale, counts):
        zeros = 0
        bad = False
        n = x.shape[0]
        m = n - n % 4
        for i in range(0, m, 4):
            for j in range(4):
                z, b = count(abs(x[i + j]), scale, counts, j)
                zeros += z
                bad |= b
        for i in range(m, n):
            z, b = count(abs(x[i]), scale, counts, 0)
            zeros += z
            bad |= b
        return zeros, bad

    @njit
    def abs_and_relu_counts(x, scale, counts, relu_scale, relu_counts):
        zeros = relu_zeros = 0
        bad = False
        n = x.shape[0]
        m = n - n % 4
        for i in range(0, m, 4):
            for j in range(4):
                z, rz, b = count_both(x[i + j], scale, counts, relu_scale, relu_counts, j)
                zeros, relu_zeros, bad = zeros + z, relu_zeros + rz, bad | b
        for i in range(m, n):
            z, rz, b = count_both(x[i], scale, counts, relu_scale, relu_counts, 0)
            zeros, relu_zeros, bad = zeros + z, relu_zeros + rz, bad | b
        return zeros, relu_zeros, bad

    return _Kernels(abs_counts, abs_and_relu_counts)


class _Kernels:
    def __init__(self, abs_counts, abs_and_relu_counts) -> None:
        self.abs_counts = abs_counts
        self.abs_and_relu_counts = abs_and_relu_counts
