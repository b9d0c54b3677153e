"""numba kernels for the histogram fold (imported only when numba is installed).

One branch-free pass per value: |x|, zero count, NaN flag, the bin index ``int(|x| * scale)``
(float32 multiply, truncation, clipped to the last bin, exactly as the numpy path computes it), and
an increment into one of four interleaved count tables (so that runs of one bin, e.g. ReLU zeros,
do not serialise on one counter).
"""
from __future__ import annotations


def compile(numba):  # noqa: A001 - the module's one entry point
    import numpy as np

    njit = numba.njit(cache=True, nogil=True, boundscheck=False)
    inf = np.inf
    zero = np.float32(0.0)

    @njit
    def abs_counts(x, scale, counts):
        top = counts.shape[1] - 1
        zeros = 0
        bad = False
        n = x.shape[0]
        m = n - n % 4
        for i in range(0, m, 4):
            for j in range(4):
                v = abs(x[i + j])
                zeros += v == 0
                bad |= not (v < inf)  # NaN or infinity
                counts[j, min(max(int(v * scale), 0), top)] += 1
        for i in range(m, n):
            v = abs(x[i])
            zeros += v == 0
            bad |= not (v < inf)
            counts[0, min(max(int(v * scale), 0), top)] += 1
        return zeros, bad

    @njit
    def abs_and_relu_counts(x, scale, counts, relu_scale, relu_counts):
        top = counts.shape[1] - 1
        relu_top = relu_counts.shape[1] - 1
        zeros = 0
        relu_zeros = 0
        bad = False
        n = x.shape[0]
        m = n - n % 4
        for i in range(0, m, 4):
            for j in range(4):
                y = x[i + j]
                v = abs(y)
                r = y if y > zero else zero  # float32, as np.maximum(x, 0) gives
                zeros += v == 0
                relu_zeros += r == 0
                bad |= not (v < inf)
                counts[j, min(max(int(v * scale), 0), top)] += 1
                relu_counts[j, min(max(int(r * relu_scale), 0), relu_top)] += 1
        for i in range(m, n):
            y = x[i]
            v = abs(y)
            r = y if y > zero else zero  # float32, as np.maximum(x, 0) gives
            zeros += v == 0
            relu_zeros += r == 0
            bad |= not (v < inf)
            counts[0, min(max(int(v * scale), 0), top)] += 1
            relu_counts[0, min(max(int(r * relu_scale), 0), relu_top)] += 1
        return zeros, relu_zeros, bad

    return _Kernels(abs_counts, abs_and_relu_counts)


class _Kernels:
    def __init__(self, abs_counts, abs_and_relu_counts) -> None:
        self.abs_counts = abs_counts
        self.abs_and_relu_counts = abs_and_relu_counts
