"""analysis/ reads the database only: importing it, and running `orchestrate figures`, never
loads torch or the model code (the resolved encoder depth comes from the database).

The exceptions are torch-free: ``core.config`` (the pydantic schema; the ``orchestrate`` CLI
builds every sub-command's parser, and ``submit``'s sweep loader imports it by contract) and
the closed-form size tables and FLOP formulas the cost estimate reads
(``core.models.geometry``, ``core.models.flops_formulas``; ``orchestrator.cost``), and the
stage toolkit's constants the stage identity reads (``core.stage.LENGTH_KEYS``, which
imports ``core.io``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from analysis_db import build_db, grid_specs

REPO = Path(__file__).resolve().parents[2]
TORCH_FREE = {"core", "core.config", "core.models", "core.models.geometry", "core.models.flops_formulas",
              "core.stage", "core.io"}

_PROBE = """
import json, sys
{body}
bad = sorted(m for m in sys.modules if m in ("torch", "torchvision", "core") or m.startswith(("torch.", "core.")))
print(json.dumps(bad))
"""


def _loaded(body: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(body=body)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_analysis_loads_no_torch_or_core():
    body = "\n".join(f"import analysis.{m}" for m in sorted(p.stem for p in (REPO / "analysis").glob("*.py")))
    assert _loaded(body) == []


def test_orchestrate_figures_loads_no_torch_or_core(tmp_path):
    url = build_db(tmp_path, grid_specs()[:2] + grid_specs()[-2:])
    out = tmp_path / "figs"
    body = (f"from orchestrator.cli import main\n"
            f"rc = main(['figures', '--db', {url!r}, '--out', {str(out)!r}])\n"
            f"assert rc == 0, rc")
    assert set(_loaded(body)) <= TORCH_FREE
    assert set(_loaded("from orchestrator.cli import build_parser\nbuild_parser()")) <= TORCH_FREE
    md = (out / "table1_structure_loss.md").read_text()
    assert "| 4 (no STC) |" in md  # vanilla k resolved from the recorded encoder depth, not VIT_SIZES
