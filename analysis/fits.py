"""Scaling-law fits L(x) = E + A·x^(−α) with bootstrap confidence intervals.

The recipe of Epoch AI's replication of Chinchilla's fit (Besiroglu et al. 2024):

* fit in log space, ``log L̂(x) = LSE(e, a − α·log x)`` with ``E = exp(e)``, ``A = exp(a)``
  (so E, A > 0 without constraints and the loss is scale-free);
* Huber loss on the log residuals ``log L̂(x_i) − log y_i``: robust to one bad run.  δ = 0.1
  (Epoch used 1e-3 for training losses known to ~0.1 %); our FIDs move ~10 % between seeds,
  so residuals below that are treated as noise (quadratic), larger ones as outliers (linear);
  a smaller δ also made L-BFGS crawl on an almost-L1 objective;
* L-BFGS-B (scipy) from a grid of 54 starting points, the best optimum wins; α is bounded to
  ±3 and E to [10⁻³·min y, max y] (outside, the objective is flat and the optimiser creeps);
  the starts (and the bootstrap refits) are solved as one separable batch per scipy call;
* confidence intervals by bootstrap: 95 % percentile intervals over refits.

x is divided by its geometric mean before fitting (conditioning; A is reported for the
original unit).  Bootstrap: with repeated runs at some x (seeds), runs are resampled with
replacement *within each x* (over runs and seeds, every x kept so the fit stays
identified) with ``bootstrap="runs"``; by default the log residuals of all runs of the full
fit are resampled (a residual bootstrap, which also works with one number per x, e.g. the
paper's, and covers better at few seeds: see :func:`fit_power_law`).  An exponent whose
interval contains 0 — or a fitted change over the data's x range whose interval contains 0
(A ≈ 0 leaves α unconstrained) — is reported as "no trend".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

HUBER_DELTA = 0.1
# |α| beyond 3 is a step, not a power law, over any range of x a sweep spans: a fit at the
# bound is reported as such (PowerLawFit.at_bound) instead of drifting to α → ∞.
ALPHA_BOUNDS = (-3.0, 3.0)
LEVEL = 0.95


@dataclass
class PowerLawFit:
    """Best fit and bootstrap intervals (``*_ci`` = (low, high) at ``LEVEL``)."""

    E: float
    A: float
    alpha: float
    n: int  # data points (runs)
    n_x: int  # distinct x values
    method: str  # bootstrap method: "runs" (within-x resampling) or "residual"
    E_ci: tuple[float, float] = (np.nan, np.nan)
    A_ci: tuple[float, float] = (np.nan, np.nan)
    alpha_ci: tuple[float, float] = (np.nan, np.nan)
    x0: float = 1.0  # normalisation of x used in the fit
    x_range: tuple[float, float] = (1.0, 1.0)  # smallest and largest x fitted
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))  # (B, 3): e, a (normalised x), α

    @property
    def change_ci(self) -> tuple[float, float]:
        """Bootstrap interval of log(L(x_max) / L(x_min)): the fitted change over the data."""
        if not len(self.boot):
            return (np.nan, np.nan)
        lx = np.log(np.array(self.x_range) / self.x0)
        ends = np.logaddexp(self.boot[:, :1], self.boot[:, 1:2] - self.boot[:, 2:3] * lx[None, :])  # (B, 2)
        change = ends[:, 1] - ends[:, 0]
        return tuple(float(v) for v in np.percentile(change, [2.5, 97.5]))

    @property
    def trend(self) -> str:
        """'decreasing' (α > 0), 'increasing' (α < 0), or 'no trend': the α interval contains
        0, or the interval of the fitted change over the x range does (A ≈ 0 leaves α free)."""
        lo, hi = self.alpha_ci
        clo, chi = self.change_ci
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0.0 <= hi or clo <= 0.0 <= chi:
            return "no trend"
        return "decreasing" if lo > 0 else "increasing"

    @property
    def at_bound(self) -> bool:
        return abs(self.alpha) > 0.98 * ALPHA_BOUNDS[1]

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    def band(self, x, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap curves at ``x``."""
        x = np.asarray(x, dtype=float)
        if not len(self.boot):
            return self.predict(x), self.predict(x)
        lx = np.log(x / self.x0)
        curves = np.exp(np.logaddexp(self.boot[:, :1], self.boot[:, 1:2] - self.boot[:, 2:3] * lx[None, :]))
        q = (1 - level) / 2
        return np.quantile(curves, q, axis=0), np.quantile(curves, 1 - q, axis=0)


def _objective(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray, delta: float):
    """Summed Huber loss of the log residuals of K independent fits, and its gradient.

    theta: (3K,) = K rows of (e, a, α); lx, ly: (K, N) data of each fit.  The K problems
    are separable, so one L-BFGS run solves all of them at once (multi-start and bootstrap
    cost two scipy calls instead of hundreds).
    """
    e, a, alpha = theta.reshape(-1, 3).T[..., None]  # each (K, 1)
    t = a - alpha * lx  # (K, N) log of the power-law term
    r = np.logaddexp(e, t) - ly  # log residuals
    w = expit(t - e)  # d LSE / d t  (1 - w = d LSE / d e)
    ar = np.abs(r)
    loss = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))  # (K, N)
    g = np.clip(r, -delta, delta)  # Huber'(r)
    gw = g * w
    grad = np.stack([(g - gw).sum(1), gw.sum(1), -(gw * lx).sum(1)], axis=1)  # (K, 3)
    return loss.sum(), grad.ravel(), loss.sum(1)


def _starts(ly: np.ndarray) -> np.ndarray:
    """(54, 3) starting points: E a share of the smallest y, A about the rest of the mean at x̃ = 1."""
    y_min, y_mean = np.exp(ly.min()), np.exp(ly.mean())
    grid = []
    for share in (0.05, 0.5, 0.9):
        e0 = np.log(share * y_min)
        a0 = np.log(max(y_mean - share * y_min, 1e-3 * y_min))
        for da in (-1.0, 0.0, 1.0):
            for alpha in (-1.0, -0.3, 0.1, 0.5, 1.0, 2.0):
                grid.append([e0, a0 + da, alpha])
    return np.array(grid)


def _solve(starts: np.ndarray, lx: np.ndarray, ly: np.ndarray, delta: float,
           chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS on K separable problems, ``chunk`` at a time: (K, 3) optima and (K,) losses.

    Chunks: one shared line search over hundreds of nearly-L1 problems converges slowly;
    a few at a time keeps both the iteration count and the Python overhead low.
    """
    # E between 0.1 % of the smallest and the largest y: below that E is indistinguishable
    # from 0 and the optimiser would creep along a flat valley towards e = −∞.
    e_bounds = (float(ly.min() + np.log(1e-3)), float(ly.max()))
    optima, losses = [], []
    for i in range(0, len(starts), chunk):
        s, bx, by = starts[i:i + chunk], lx[i:i + chunk], ly[i:i + chunk]
        res = minimize(lambda th: _objective(th, bx, by, delta)[:2], s.ravel(), jac=True, method="L-BFGS-B",
                       bounds=[e_bounds, (None, None), ALPHA_BOUNDS] * len(s),
                       options={"maxiter": 400, "maxfun": 800, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 20})
        optima.append(res.x.reshape(-1, 3))
        losses.append(_objective(res.x, bx, by, delta)[2])
    return np.concatenate(optima), np.concatenate(losses)


def fit_power_law(x, y, n_boot: int = 200, bootstrap: str = "residual", seed: int = 0, delta: float = HUBER_DELTA,
                  level: float = LEVEL) -> PowerLawFit:
    """Fit ``y ≈ E + A·x^(−α)`` to positive data; bootstrap intervals (module docstring).

    Parameters
    ----------
    x, y : 1-D arrays of the runs (one entry per run and seed), all > 0.
    n_boot : bootstrap refits (0 = point estimate only).
    bootstrap : ``"residual"`` (default): the log residuals of every run (each seed a data
        point) are resampled over all runs, rescaled by √(N/(N−3)) for the three fitted
        parameters; ``"runs"``: runs resampled with replacement within each x (needs seeds).
        Measured on 16 synthetic sets of 5 scales × 4 seeds (tests/analysis/test_fits.py),
        the residual intervals held the true α in 13/16, within-x run resampling in only
        9/16: with 4 seeds per x, resampling them shrinks the spread by (n−1)/n and has
        few distinct replicates.

    Raises
    ------
    ValueError
        with fewer than 3 distinct x values (3 parameters) or non-positive values.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("power-law fit needs x > 0 and y > 0")
    xs = np.unique(x)
    if len(xs) < 3:
        raise ValueError(f"power-law fit needs at least 3 distinct x values, got {len(xs)}")
    x0 = float(np.exp(np.log(x).mean()))
    lx, ly = np.log(x / x0), np.log(y)
    # multi-start: every grid point solved at once, the lowest loss wins
    starts = _starts(ly)
    optima, losses = _solve(starts, np.broadcast_to(lx, (len(starts), len(lx))),
                            np.broadcast_to(ly, (len(starts), len(ly))), delta)
    ok = np.isfinite(losses) & np.isfinite(optima).all(1)
    theta = optima[ok][np.argmin(losses[ok])]
    if bootstrap not in ("residual", "runs"):
        raise ValueError(f"bootstrap must be 'residual' or 'runs', got {bootstrap!r}")
    repeated = bootstrap == "runs"
    if repeated and len(xs) == len(x):
        raise ValueError("bootstrap='runs' needs repeated runs (seeds) at some x")
    method = bootstrap
    rng = np.random.default_rng(seed)
    boot = np.empty((0, 3))
    if n_boot:
        if repeated:  # resample runs (seeds) within each x: every x stays in every replicate
            index = [np.flatnonzero(x == v) for v in xs]
            pick = np.stack([np.concatenate([rng.choice(ix, size=len(ix)) for ix in index]) for _ in range(n_boot)])
            bx, by = lx[pick], ly[pick]  # (B, N)
        else:  # resample the full fit's log residuals, rescaled for the 3 fitted parameters
            resid = ly - np.logaddexp(theta[0], theta[1] - theta[2] * lx)
            resid = (resid - resid.mean()) * np.sqrt(len(resid) / max(len(resid) - 3, 1))
            bx = np.broadcast_to(lx, (n_boot, len(lx)))
            by = (ly - resid)[None, :] + rng.choice(resid, size=(n_boot, len(resid)))
        # replicates start from the full fit (their optimum is close to it)
        boot, blosses = _solve(np.tile(theta, (n_boot, 1)), bx, by, delta)
        boot = boot[np.isfinite(blosses) & np.isfinite(boot).all(1)]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def ci(values) -> tuple[float, float]:
        return tuple(float(v) for v in np.percentile(values, q)) if len(values) else (np.nan, np.nan)

    e, a, alpha = theta
    return PowerLawFit(
        E=float(np.exp(e)), A=float(np.exp(a) * x0 ** alpha), alpha=float(alpha), n=len(x), n_x=len(xs),
        method=method, E_ci=ci(np.exp(boot[:, 0])), A_ci=ci(np.exp(boot[:, 1]) * x0 ** boot[:, 2]),
        alpha_ci=ci(boot[:, 2]), x0=x0, x_range=(float(xs[0]), float(xs[-1])), boot=boot,
    )


def describe_fit(f: PowerLawFit) -> str:
    """``α = 0.52 [0.31, 0.80], E = 1.2 [0.4, 2.0]`` (+ ``, no trend`` when the α CI holds 0)."""
    lo, hi = f.alpha_ci
    text = f"α = {f.alpha:.2f} [{lo:.2f}, {hi:.2f}], E = {f.E:.3g} [{f.E_ci[0]:.3g}, {f.E_ci[1]:.3g}]"
    return text + (", no trend" if f.trend == "no trend" else "")
