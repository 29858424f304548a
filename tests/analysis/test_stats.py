"""Seed statistics: 95 % t-intervals, ± columns, 'not significant' marks, CI error bars."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.common import aggregate, prepare
from analysis.registry import REGISTRY
from analysis.stats import not_significant, overlaps, t_halfwidth, t_interval, welch_interval


def test_t_interval_matches_the_textbook_formula():
    # n = 3, s = 1: half-width = t_{0.975, 2} / sqrt(3) = 4.3027 / 1.7321
    assert t_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    mean, half, n = t_interval([1.0, np.nan, 3.0])
    assert (mean, n) == (2.0, 2) and half == pytest.approx(stats.t.ppf(0.975, 1) * np.sqrt(2) / np.sqrt(2))
    assert np.isnan(t_halfwidth([5.0])) and np.isnan(t_interval([])[0])
    # coverage: ~95 % of intervals from normal samples of 4 contain the true mean
    rng = np.random.default_rng(0)
    samples = rng.normal(3.0, 2.0, size=(4000, 4))
    hits = [abs(s.mean() - 3.0) <= t_halfwidth(s) for s in samples]
    assert 0.94 < np.mean(hits) < 0.96


def test_welch_interval_is_scipys_and_covers_at_the_nominal_rate():
    a, b = [4.23, 4.80, 4.28], [7.78, 7.28, 7.79, 7.5]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    diff, lo, hi, df = welch_interval(a, b)
    assert diff == pytest.approx(np.mean(a) - np.mean(b)) and (lo, hi) == pytest.approx((ref.low, ref.high))
    assert all(np.isnan(welch_interval([1.0], [2.0, 3.0])))
    # 3 seeds a side, unequal spread (sd 1 vs 3): ~95 % of intervals hold the true difference
    # (4,000 studies: a 5 % miss rate is told from 8 % at > 8 standard errors)
    rng = np.random.default_rng(1)
    hits = [lo <= -2.0 <= hi for lo, hi in
            (welch_interval(rng.normal(1.0, 1.0, 3), rng.normal(3.0, 3.0, 3))[1:3] for _ in range(4000))]
    assert 0.935 < np.mean(hits) < 0.975


def test_overlap_rule():
    assert overlaps(10.0, 1.0, 11.5, 0.6) and not overlaps(10.0, 1.0, 11.7, 0.6)
    assert not overlaps(10.0, np.nan, 10.0, 1.0)  # no interval: untested, never 'not significant'
    # lower is better: cell 1 overlaps the best (cell 0); cell 2 does not; cell 3 has n = 1
    flags = not_significant([10.0, 10.5, 20.0, 10.1], [1.0, 1.0, 1.0, np.nan], [3, 3, 3, 1], "↓")
    assert flags == [False, True, False, False]
    assert not_significant([1.0, 2.0], [5.0, 5.0], [3, 3], "") == [False, False]


def _runs() -> pd.DataFrame:
    rows = []
    # three split depths × three seeds; rFID of k=2 overlaps vanilla's, k=1's does not
    for k, rfid in ((None, [10.0, 11.0, 12.0]), (2, [10.5, 11.5, 12.5]), (1, [20.0, 20.5, 21.0])):
        for seed, v in enumerate(rfid):
            rows.append({"run_hash": f"{k}-{seed}", "sweep": "s", "status": "finished", "data.image_size": 32,
                         "model.patch_size": 4, "model.encoder_size": "micro", "model.split_depth": k,
                         "encoder_depth": 4, "ssl.method": "none", "train.seed": seed, "rfid": v,
                         "rfid_backbone": "inception-v3-compat"})
    return pd.DataFrame(rows)


def test_aggregate_reports_the_interval():
    agg = aggregate(prepare(_runs()), ["k"], ["rfid"])
    vanilla = agg[agg["k"] == 4].iloc[0]
    assert vanilla["rfid"] == 11.0 and vanilla["rfid_n"] == 3
    assert vanilla["rfid_ci"] == pytest.approx(t_halfwidth([10.0, 11.0, 12.0]))


def test_tables_carry_pm_columns_and_mark_overlaps(tmp_path):
    out = REGISTRY["table6_split_depth"].fn(_runs(), tmp_path)
    assert out.files, out.warnings
    md = (tmp_path / "table6_split_depth.md").read_text()
    assert "95 % t-interval" in md.splitlines()[0]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert header[header.index("rFID") + 1] == "± rFID"
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in md.splitlines()[4:]}
    i = header.index("rFID")
    assert rows["4 (no STC)"][i:i + 2] == ["11.00", "2.48"]  # best: no mark
    assert rows["2"][i:i + 2] == ["11.50ⁿˢ", "2.48"]  # overlaps the best: not significant at n = 3
    assert rows["1"][i:i + 2] == ["20.50", "1.24"]  # clearly worse: no mark
    assert rows["2"][header.index("runs")] == "3"
    tex = (tmp_path / "table6_split_depth.tex").read_text()
    assert r"11.50$^{\mathrm{ns}}$" in tex and r"$\pm$ rFID" in tex


def test_figures_draw_ci_error_bars(tmp_path):
    import matplotlib.pyplot as plt
    from analysis.render import _draw_lines

    agg = aggregate(prepare(_runs()), ["k", "tokens"], ["rfid"])
    fig, ax = plt.subplots()
    _draw_lines(ax, agg, "tokens", ["k"], "rfid", paper=False, colors={})
    # one errorbar container per line, bar half-lengths = the t-interval half-widths
    bars = [c for c in ax.containers if c.has_yerr]
    segs = sorted(float(np.ptp(seg[:, 1])) / 2 for c in bars for seg in c.lines[2][0].get_segments())
    assert segs == pytest.approx(sorted(agg["rfid_ci"]))
    assert {t.get_text() for t in ax.texts} == {"n=3"}
    plt.close(fig)
