"""Built-in stages that need no core code: stand-ins for training and evaluation in the
orchestrator's own tests and the ``--executor`` smoke checks (``orchestrator.stages.STAGES``).
Their stage identity covers the whole config (``orchestrator.identity.STAGES``): they read keys
named by their params."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from core.io import write_json_atomic


def echo_stage(ctx) -> dict:  # ctx: orchestrator.stages.StageContext
    """Needs no core code: reports the run's seed and which parents' results exist."""
    parents = sorted(p.name for p in (ctx.run_root / "results").glob("*.json"))
    return {"metrics": [{"name": "echo", "value": float(ctx.tree["train"]["seed"])}], "info": {"parents": parents}}


def dotted_get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def selftest_stage(ctx) -> dict:  # ctx: orchestrator.stages.StageContext
    """A checkpointable counter standing in for training (needs no core code).

    Counts ``train.steps`` steps (``params.step_s`` seconds each), folding each step into
    a checksum; saves ``{step, checksum}`` every ``train.ckpt_every`` steps and resumes
    from the latest save.  An interrupted-and-resumed run therefore ends with the same
    checksum as an uninterrupted one.  ``objective = (x - target)^2`` with ``x`` the
    config value at ``params.objective_key`` (default ``loss.ssl``) feeds search tests.
    ``params.fail_when`` ({dotted key: value}) makes matching runs raise while
    ``params.fail_marker`` (a path; None = always) exists.
    """
    p, tree = ctx.params, ctx.tree
    fail_when = p.get("fail_when") or {}
    if fail_when and all(dotted_get(tree, k) == v for k, v in fail_when.items()):
        marker = p.get("fail_marker")
        if marker is None or Path(marker).exists():
            print(f"selftest: failing on purpose ({fail_when})", file=sys.stderr, flush=True)
            raise RuntimeError(f"selftest failure requested for {fail_when}")
    steps, every = tree["train"]["steps"], max(1, tree["train"]["ckpt_every"])
    ckpt_dir = ctx.out_dir / "checkpoints"
    saved = sorted(ckpt_dir.glob("step_*.json"))
    state = json.loads(saved[-1].read_text()) if saved else {"step": 0, "checksum": tree["train"]["seed"]}
    with open(ctx.out_dir / "starts.txt", "a") as f:  # one line per (re)start: where it resumed
        f.write(f"{state['step']}\n")
    while state["step"] < steps:
        time.sleep(float(p.get("step_s", 0.0)))
        state["step"] += 1
        state["checksum"] = (state["checksum"] * 31 + state["step"] ** 2) % 1_000_003
        if state["step"] % every == 0 or state["step"] == steps:
            write_json_atomic(ckpt_dir / f"step_{state['step']:08d}.json", state)
        (ctx.out_dir / "progress.txt").write_text(f"{state['step']}\n")
    starts = [int(x) for x in (ctx.out_dir / "starts.txt").read_text().split()]
    x = float(dotted_get(tree, p.get("objective_key", "loss.ssl")))
    metrics = [
        {"name": "checksum", "value": float(state["checksum"]), "step": steps},
        {"name": "objective", "value": (x - float(p.get("target", 2.0))) ** 2, "step": steps},
    ]
    return {"metrics": metrics, "info": {"starts": starts}}
