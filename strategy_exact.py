"""Exact decisions of the kernel strategies' near-ties, in ticks of the prices' own grid.

Part of `strategy` (its kernels import these). Archive prices are doubles of decimal
numbers on the market's tick grid, and a crossing must be decided as those decimals decide
it, not by the last bit of a float sum (an SMA tie is common on a coarse tick). The
indicator values stay TA-Lib's floats; only the comparison changes.

The SMA cross compares in float when the difference is larger than a proven bound on its
rounding error, and otherwise recomputes the two window sums exactly in int64 ticks of the
window's own decimal grid (the fewest decimals that give every close back exactly; no tick
size is needed, and no other rows matter). A window off any grid of up to `MAX_DECIMALS`
decimals, or too large for int64, keeps the float decision. The exact path runs only on
near-ties, so the kernel keeps most of its speed.
"""

from __future__ import annotations

import numpy as np
from numba import njit


U = 2.0**-53  # unit roundoff of float64
MAX_DECIMALS = 15
POW10 = np.array([10.0**d for d in range(MAX_DECIMALS + 1)])
INT_LIMIT = 2.0**61  # products compared in int64 stay below this


@njit(cache=True)
def decimals(x, first=0):  # type: ignore[no-untyped-def]
    """Return the fewest decimals d >= first that give x back exactly, or -1.

    x is then the double nearest to an integer / 10**d (a double on a grid of d decimals
    is on every finer one up to 2**50 ticks).
    """
    for d in range(first, MAX_DECIMALS + 1):
        m = np.rint(x * POW10[d])
        if abs(m) < 2.0**50 and m / POW10[d] == x:
            return d
    return -1


@njit(cache=True)
def grid(a, lo, hi, factor):  # type: ignore[no-untyped-def]
    """Return the common decimal grid of a[lo:hi], or -1.

    -1 when a value is off every grid or when max|a| * 10**d * factor would leave the int64
    range the caller needs.
    """
    d = 0
    top = 0.0
    for j in range(lo, hi):
        # Most values are on the grid found so far: one check each. One that is not needs
        # more decimals than d (on a coarser grid it would be on this one too).
        d = decimals(a[j], d)
        if d < 0:
            return -1
        top = max(top, abs(a[j]))
    if top * POW10[d] * factor >= INT_LIMIT:
        return -1
    return d


@njit(cache=True)
def ticks(x, d):  # type: ignore[no-untyped-def]
    """Return x in int64 ticks of d decimals."""
    return np.int64(np.rint(x * POW10[d]))


@njit(cache=True)
def tick_sum(a, lo, hi, d):  # type: ignore[no-untyped-def]
    """Return the sum of a[lo:hi] in int64 ticks of d decimals."""
    total = np.int64(0)
    for j in range(lo, hi):
        total += ticks(a[j], d)
    return total


@njit(cache=True)
def sign(a, b):  # type: ignore[no-untyped-def]
    """Return the sign of a - b (1.0, -1.0 or 0.0)."""
    return 1.0 if a > b else (-1.0 if a < b else 0.0)


@njit(cache=True)
def ratio(x):  # type: ignore[no-untyped-def]
    """Return x as a reduced fraction (num, den) of its decimal, or (0, 0) off every grid.

    den divides a power of ten; parameters such as 1.5 or 2.25 stay small: 3/2, 9/4.
    """
    d = decimals(x)
    if d < 0:
        return np.int64(0), np.int64(0)
    num = np.int64(np.rint(x * POW10[d]))
    den = np.int64(np.rint(POW10[d]))
    a, b = abs(num), den
    while b:
        a, b = b, a % b
    return num // a, den // a
