"""The paper's own numbers as the first real check of fit-small / predict-large (issue 17 §3).

For every paper table with ≥ 4 token counts on a line (``analysis/paper_data.yaml``: Table 3,
rFID and gFID vs patch size, SSL off and on; Table 1's gFID column repeats Table 3's SSL
rows), the smaller token counts are fitted and the largest predicted, with both laws a
3-point fit allows: ``E + A·T^(−α)`` (3 parameters: exactly determined, no residual degree of
freedom, so no interval) and ``A·T^(−α)`` (2 parameters, 1 dof, t-interval with
t_{0.975,1} = 12.7).  ``python -m analysis.paper_check`` prints the table in
docs/scaling_laws.md (a test keeps the two equal).
"""
from __future__ import annotations

import pandas as pd

from analysis.common import prepare
from analysis.fits import fit_power_law
from analysis.paper import paper_runs
from analysis.predict import PureFit


def paper_extrapolation(table: str = "table3", level: float = 0.95) -> pd.DataFrame:
    df = prepare(paper_runs(table))
    rows = []
    for ssl, g in df.groupby("ssl", sort=False):
        g = g.sort_values("tokens")
        for metric in ("rfid", "gfid"):
            x, y = g["tokens"].to_numpy(float), g[metric].to_numpy(float)
            small, target, measured = x[:-1], x[-1], y[-1]
            full = fit_power_law(small, y[:-1], level=level)
            pure = PureFit(small, y[:-1])
            v, lo, hi = (float(a[0]) for a in pure.predict_interval([target], 1, level))
            rows.append({"table": table, "SSL": "no SSL" if ssl == "none" else f"SSL {ssl}", "metric": metric,
                         "fit on tokens": ", ".join(f"{t:g}" for t in small), "target tokens": f"{target:g}",
                         "measured": measured,
                         "E + A·T^-α (0 dof)": float(full.predict([target])[0]),
                         "A·T^-α (1 dof)": v, "95 % PI (A·T^-α)": f"[{lo:.3g}, {hi:.3g}]",
                         "covered": "yes" if lo <= measured <= hi else "no",
                         "error of E + A·T^-α": f"{(float(full.predict([target])[0]) - measured) / measured:+.0%}"})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    cells = frame.copy()
    for c in ("measured", "E + A·T^-α (0 dof)", "A·T^-α (1 dof)"):
        cells[c] = [f"{v:.3g}" for v in cells[c]]
    head = "| " + " | ".join(cells.columns) + " |\n|" + "|".join("---" for _ in cells.columns) + "|\n"
    return head + "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in cells.itertuples(index=False)) + "\n"


if __name__ == "__main__":
    print(markdown(paper_extrapolation()), end="")
