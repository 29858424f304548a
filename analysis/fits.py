"""Scaling-law fits L(x) = E + A·x^(−α) with t-based intervals (one variable; the machinery
of :mod:`analysis.laws`, J = 1).

The fit is the recipe of Epoch AI's replication of Chinchilla's fit (Besiroglu et al. 2024):
log space, ``log L̂(x) = LSE(e, a − α·log x)``; Huber loss on the log residuals with δ = 0.1
(Epoch used 1e-3 for training losses known to ~0.1 %; our FIDs move ~10 % between seeds, so
residuals below that are noise, larger ones outliers); multi-start (54 starts), the best
optimum wins; α bounded to ±3 and E to [10⁻³·min y, max y].  x is divided by its geometric
mean (A is reported in the original unit).  Every run and seed is a data point.

Intervals (the argument is in :mod:`analysis.laws`): profile-t for α and E, Wald-t in log
space for A, t-based bands and prediction intervals, all with n − 3 residual degrees of
freedom.  The percentile residual bootstrap used before was too narrow at the few residual
degrees of freedom of a sweep (95 % intervals held α in ~88 % of simulated 4 × 3 studies).

The trend verdict is a test, calibrated on its own: the slope of log y on log x with its
Student-t interval (n − 2 dof; exact for flat data with log-normal seed noise, whatever the
machine); a trend is called only when that interval excludes 0 *and* α's interval excludes 0
on the same side (a power law rises or falls monotonically with the sign of α).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis import laws
from analysis.laws import HUBER_DELTA, LEVEL  # noqa: F401  (re-exported)

ALPHA_BOUNDS = laws.EXP_BOUNDS
METHOD = "profile-t (α, E), Wald-t (A), n − 3 dof"
_ALPHA_GRID = np.linspace(ALPHA_BOUNDS[0], ALPHA_BOUNDS[1], 41)  # 0.15 apart; ends refined
_E_GRID = 41  # log E from its lower bound to max y


@dataclass
class PowerLawFit:
    """Best fit and intervals (``*_ci`` = (low, high) at ``level``; NaN with < 1 residual dof)."""

    E: float
    A: float
    alpha: float
    n: int  # data points (runs)
    n_x: int  # distinct x values
    method: str = METHOD
    E_ci: tuple[float, float] = (np.nan, np.nan)
    A_ci: tuple[float, float] = (np.nan, np.nan)
    alpha_ci: tuple[float, float] = (np.nan, np.nan)
    x0: float = 1.0  # normalisation of x used in the fit
    x_range: tuple[float, float] = (1.0, 1.0)  # smallest and largest x fitted
    theta: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (e, a, α), normalised x
    cov: np.ndarray = field(default_factory=lambda: np.full((3, 3), np.nan))  # of theta
    s: float = np.nan  # residual standard deviation of log y (seed noise + misfit)
    slope_ci: tuple[float, float] = (np.nan, np.nan)  # slope of log y on log x (the trend test)
    level: float = LEVEL

    @property
    def dof(self) -> int:
        return self.n - 3

    @property
    def trend(self) -> str:
        """'decreasing', 'increasing' or 'no trend' (module docstring: slope test and α)."""
        lo, hi = self.alpha_ci
        slo, shi = self.slope_ci
        if not all(np.isfinite(v) for v in (lo, hi, slo, shi)):
            return "no trend"
        if shi < 0 and lo > 0:
            return "decreasing"
        if slo > 0 and hi < 0:
            return "increasing"
        return "no trend"

    @property
    def at_bound(self) -> bool:
        return abs(self.alpha) > 0.98 * ALPHA_BOUNDS[1]

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    def _lx(self, x) -> np.ndarray:
        return np.log(np.atleast_1d(np.asarray(x, dtype=float)) / self.x0)[:, None]

    def band(self, x, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise t-interval of the fitted curve at ``x`` (parameter uncertainty only)."""
        m, h = laws.log_interval(self.theta, self.cov, self._lx(x), self.s, self.dof, np.inf, level or self.level)
        if not np.isfinite(h).all():
            return np.exp(m), np.exp(m)
        return np.exp(m - h), np.exp(m + h)

    def predict_interval(self, x, seeds: float = 1, level: float | None = None):
        """``(value, low, high)`` at ``x``: the curve and the interval that the mean of
        ``seeds`` new runs falls in (parameter uncertainty + seed noise); NaN ends without
        residual degrees of freedom."""
        m, h = laws.log_interval(self.theta, self.cov, self._lx(x), self.s, self.dof, seeds, level or self.level)
        return np.exp(m), np.exp(m - h), np.exp(m + h)


def slope_interval(lx: np.ndarray, ly: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the OLS slope of ly on lx (n − 2 dof)."""
    n = len(lx)
    if n < 3 or np.ptp(lx) == 0:
        return (np.nan, np.nan)
    xc = lx - lx.mean()
    b = (xc * (ly - ly.mean())).sum() / (xc ** 2).sum()
    r = ly - ly.mean() - b * xc
    se = np.sqrt((r ** 2).sum() / (n - 2) / (xc ** 2).sum())
    h = laws.t_quantile(n - 2, level) * se
    return (float(b - h), float(b + h))


def fit_power_law(x, y, delta: float = HUBER_DELTA, level: float = LEVEL) -> PowerLawFit:
    """Fit ``y ≈ E + A·x^(−α)`` to positive data; t-based intervals (module docstring).

    Parameters
    ----------
    x, y : 1-D arrays of the runs (one entry per run and seed), all > 0.

    Raises
    ------
    ValueError
        with fewer than 3 distinct x values (3 parameters) or non-positive values.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return fit_power_laws(x[keep], y[keep][None], delta, level)[0]


def fit_power_laws(x, Y, delta: float = HUBER_DELTA, level: float = LEVEL) -> list[PowerLawFit]:
    """:func:`fit_power_law` of S data sets ``Y`` (S, N) sharing ``x`` (N,), solved together
    (simulation studies: hundreds of fits in a few vectorised solves)."""
    x, Y = np.asarray(x, dtype=float), np.atleast_2d(np.asarray(Y, dtype=float))
    if not (np.isfinite(x).all() and np.isfinite(Y).all()) or (x <= 0).any() or (Y <= 0).any():
        raise ValueError("power-law fit needs finite x > 0 and y > 0")
    xs = np.unique(x)
    if len(xs) < 3:
        raise ValueError(f"power-law fit needs at least 3 distinct x values, got {len(xs)}")
    x0 = float(np.exp(np.log(x).mean()))
    lx, LY = np.log(x / x0)[:, None], np.log(Y)
    thetas, losses = laws.best_fits(lx, LY, delta)
    alpha_cis = laws.profile_intervals(thetas, losses, lx, LY, 2, _ALPHA_GRID, level, delta)
    # E profiled too: its Wald interval held the truth in only 64 % of simulated studies whose
    # floor lies far below the data (tests/analysis/test_fits_calibration.py); log E from its
    # lower bound to max y, per data set
    e_lo = LY.min(1) + np.log(1e-3)
    e_cis = laws.profile_intervals(thetas, losses, lx, LY, 0,
                                   e_lo[:, None] + np.linspace(0.0, 1.0, _E_GRID) * (LY.max(1) - e_lo)[:, None],
                                   level, delta)
    fits = []
    for theta, ly, alpha_ci, e_ci in zip(thetas, LY, alpha_cis, np.exp(e_cis)):
        lo, hi = laws.default_bounds(ly, 1)
        cov, s, dof = laws.covariance(theta, lx, ly, lo, hi)
        t = laws.t_quantile(dof, level)

        def wald(v, var):  # exp of a log-space Wald-t interval; none for a parameter on its bound
            if not (dof >= 1 and var > 0):
                return (np.nan, np.nan)
            with np.errstate(over="ignore"):
                return (float(np.exp(v - t * np.sqrt(var))), float(np.exp(v + t * np.sqrt(var))))

        la, var_la = laws.to_original(theta, cov, np.array([x0]))
        fits.append(PowerLawFit(
            E=float(np.exp(theta[0])), A=float(np.exp(la[0])), alpha=float(theta[2]), n=len(x), n_x=len(xs),
            E_ci=tuple(float(v) for v in e_ci), A_ci=wald(la[0], var_la[0]), alpha_ci=tuple(float(v) for v in alpha_ci),
            x0=x0, x_range=(float(xs[0]), float(xs[-1])), theta=theta, cov=cov, s=s,
            slope_ci=slope_interval(lx[:, 0], ly, level), level=level,
        ))
    return fits


def describe_fit(f: PowerLawFit) -> str:
    """``α = 0.52 [0.31, 0.80], E = 1.2 [0.4, 2.0]`` (+ ``, no trend`` when no trend is shown)."""
    lo, hi = f.alpha_ci
    text = f"α = {f.alpha:.2f} [{lo:.2f}, {hi:.2f}], E = {f.E:.3g} [{f.E_ci[0]:.3g}, {f.E_ci[1]:.3g}]"
    return text + (", no trend" if f.trend == "no trend" else "")
