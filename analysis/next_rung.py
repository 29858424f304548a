"""Choose the next rung of a scaling study under a compute budget (``orchestrate next``).

Input: one row per candidate configuration (not yet run) with its predicted metric and
prediction interval (:func:`analysis.predict.predict_targets`) and its cost in the budget's
unit (the orchestrator's cost model, or measured hours).  Lower metric is better (FIDs).

The proposal, in order:

1. **best within budget** — among the candidates whose cost fits the budget, the lowest
   predicted metric: what the fitted law says is the best thing this budget can buy;
2. **most informative per unit cost** — with what is left, greedily the candidates whose
   prediction interval is widest in log units per unit of cost: the rungs where a
   measurement shrinks the law's uncertainty most for the money (a wide interval means the
   fit is extrapolating; the measurement pins the curve there).

Each row says why it was chosen, with its predicted value ± interval and cost.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def propose(cand: pd.DataFrame, budget: float, unit: str = "GPU-h") -> tuple[pd.DataFrame, list[str]]:
    """``cand`` columns: ``target, value, lower, upper, cost``.  Returns the chosen rows
    (``reason`` added, in choice order) and a note per candidate left out."""
    c = cand.copy()
    c = c[np.isfinite(c["value"].astype(float)) & np.isfinite(c["cost"].astype(float))]
    notes = [f"{t}: costs {k:.4g} {unit}, over the budget of {budget:.4g}" for t, k in zip(c["target"], c["cost"])
             if k > budget]
    c = c[c["cost"] <= budget]
    if c.empty:
        return c.assign(reason=pd.Series(dtype=object)), notes or ["no candidate"]
    best = c.loc[c["value"].astype(float).idxmin()]
    chosen = [dict(best, reason=f"best predicted value within {budget:.4g} {unit}")]
    left = budget - float(best["cost"])
    rest = c.drop(index=best.name)
    width = np.log(rest["upper"].astype(float) / rest["lower"].astype(float))
    rest = rest.assign(_gain=np.where(np.isfinite(width), width, 1e9) / np.maximum(rest["cost"].astype(float), 1e-12))
    for _, r in rest.sort_values("_gain", ascending=False).iterrows():
        if r["cost"] <= left:
            chosen.append(dict(r.drop("_gain"), reason=f"widest interval per {unit} "
                                                       f"(log width {np.log(r['upper'] / r['lower']):.2f}): "
                                                       "measuring it pins the law where it extrapolates"))
            left -= float(r["cost"])
        else:
            notes.append(f"{r['target']}: {r['cost']:.4g} {unit} does not fit the {left:.4g} {unit} left")
    return pd.DataFrame(chosen), notes
