"""Seed statistics: 95 % t-intervals of a cell's mean and the overlap rule tables use.

Runs differing only in seed are repeated measurements of one configuration; a cell reports
its mean, the half-width of the two-sided 95 % Student-t interval of that mean and n:

    mean ± t_{0.975, n-1} · s / √n        (s: sample standard deviation, ddof = 1)

With n = 1 there is no interval (NaN): a single run cannot separate a config from its noise.
Tables comparing configurations call two cells *not significantly different at this n*
when their intervals overlap (a conservative rule: non-overlap implies p < 0.05 for a
two-sample test, overlap does not prove equality).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _st

LEVEL = 0.95
NS_MARK = "ⁿˢ"  # appended to a table cell whose interval overlaps the best cell's
NS_NOTE = ("mean ± 95 % t-interval over seeds (n in 'runs'); ⁿˢ: interval overlaps that of the best "
           "row in its column, not significantly different at this n; n = 1: no interval, untested")


def t_halfwidth(values, level: float = LEVEL) -> float:
    """Half-width of the two-sided ``level`` t-interval of the mean of ``values`` (NaN if n < 2)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan")
    return float(_st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def t_interval(values, level: float = LEVEL) -> tuple[float, float, int]:
    """``(mean, half-width, n)`` of the finite ``values``; mean NaN when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.mean()) if len(v) else float("nan")), t_halfwidth(v, level), len(v)


def overlaps(mean_a: float, half_a: float, mean_b: float, half_b: float) -> bool:
    """True when [a ± half_a] and [b ± half_b] intersect (NaN half-width: no interval → False)."""
    if not (np.isfinite(half_a) and np.isfinite(half_b)):
        return False
    return abs(mean_a - mean_b) <= half_a + half_b


def not_significant(means, halves, ns, better: str) -> list[bool]:
    """Per cell: does its interval overlap the best cell's (``better`` '↓' lowest, '↑' highest)?

    Only cells with n ≥ 2 are tested (and only against a best cell with n ≥ 2); the best
    cell itself and untested cells are False.  An unknown direction tests nothing.
    """
    means, halves, ns = (np.asarray(a, dtype=float) for a in (means, halves, ns))
    out = [False] * len(means)
    ok = np.isfinite(means) & (ns >= 2) & np.isfinite(halves)
    if better not in ("↓", "↑") or ok.sum() < 2:
        return out
    idx = np.flatnonzero(ok)
    best = idx[np.argmin(means[idx])] if better == "↓" else idx[np.argmax(means[idx])]
    for i in idx:
        if i != best and overlaps(means[i], halves[i], means[best], halves[best]):
            out[i] = True
    return out


def welch_interval(a, b, level: float = LEVEL) -> tuple[float, float, float, float]:
    """``(mean(a) − mean(b), low, high, df)``: the two-sided ``level`` Welch interval of a
    difference of two configurations' means over their seeds (unequal variances; NaNs where
    either side has fewer than 2 finite values).  A claim "a < b" is shown when ``high < 0``."""
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return (float("nan"),) * 4
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    if va + vb == 0:
        return diff, diff, diff, float(len(a) + len(b) - 2)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(_st.t.ppf(0.5 + level / 2, df) * np.sqrt(va + vb))
    return diff, diff - half, diff + half, float(df)
