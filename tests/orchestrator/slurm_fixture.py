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


PAUSING_SBATCH = r"""#!/bin/bash
# The real sbatch, except call number $INDEX (0-based: one call per job array), which stops
# before or after the real one and touches $DIR/paused, until its caller (the orchestrator) dies.
n=$(cat "$DIR/calls" 2>/dev/null || echo 0); echo $((n + 1)) > "$DIR/calls"
hold() { touch "$DIR/paused"; while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done; }
if [ "$n" = "$INDEX" ] && [ "$WHEN" = before_sbatch ]; then hold; exit 1; fi
out=$("$REAL" "$@"); rc=$?
if [ "$n" = "$INDEX" ]; then hold; fi
printf '%s\n' "$out"; exit $rc
"""


def pause_at_sbatch(tmp_path: Path, where: str) -> tuple[dict, Path]:
    """Environment for an ``orchestrate`` subprocess whose sbatch of array N stops there
    (``where`` = ``before_sbatch:N`` / ``after_sbatch:N``), and the file that appears once it
    has stopped: a test SIGKILLs the orchestrator exactly between two sbatch calls."""
    import os
    import shutil

    when, index = where.split(":")
    folder = tmp_path / "pausing_sbatch"
    folder.mkdir()
    script = folder / "sbatch"
    script.write_text(PAUSING_SBATCH.replace("$REAL", shutil.which("sbatch")).replace("$DIR", str(folder))
                      .replace("$INDEX", index).replace("$WHEN", when))
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}, folder / "paused"


def wait_paused(marker: Path, proc, timeout: float = 120.0) -> None:
    """Block until the paused sbatch of :func:`pause_at_sbatch` has stopped (or fail with the
    orchestrator's output if it ended first)."""
    import time

    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"orchestrate ended before the pause: {proc.communicate(timeout=60)}")
        assert time.monotonic() < deadline, "the paused sbatch was never reached"
        time.sleep(0.05)
