"""Validating a sweep and `submit --dry-run` import no torch (issue 11 item 5): the geometry
check and the size registries live in the torch-free ``core.models.geometry``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_validation_and_dry_run_import_no_torch(tmp_path):
    code = ("import sys; from orchestrator.sweep import load_sweep; "
            "s = load_sweep('sweeps/token_scaling.yaml'); assert len(s.runs) == 120; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "submit", "sweeps/quickstart.yaml",
                          "--dry-run", "--db", f"sqlite:///{tmp_path}/none.db"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm", "torchvision", "pandas")}
    assert "dry run: nothing submitted" in out.stdout and not (tmp_path / "none.db").exists()


def test_geometry_is_one_function_and_one_registry():
    from core.models import dit, geometry, tokenizer

    assert tokenizer.check_geometry is geometry.check_geometry
    assert tokenizer.VIT_SIZES is geometry.VIT_SIZES and dit.DIT_SIZES is geometry.DIT_SIZES
