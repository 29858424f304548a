"""Session fixture: the real single-node Slurm (with accounting) of ``scripts/start_slurm.sh``.

Import it into a test module (``from slurm_fixture import slurm_cluster``).  Tests using it
skip, with the reason, only when Slurm cannot be started here.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator import slurm

START_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "start_slurm.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Name of the default partition of a running Slurm; starts it if needed."""
    if not slurm.available():
        if not START_SCRIPT.exists():
            pytest.skip(f"Slurm is not running and {START_SCRIPT} does not exist")
        try:
            out = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"Slurm could not start: {e}")
        if out.returncode != 0 or not slurm.available():
            pytest.skip(f"Slurm could not start (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    if subprocess.run(["sacct", "-n", "-j", "1"], capture_output=True).returncode != 0:
        pytest.skip("Slurm runs without accounting (sacct fails): job states cannot be read")
    part = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return next((p.rstrip("*") for p in part if p.endswith("*")), part[0] if part else "debug")
