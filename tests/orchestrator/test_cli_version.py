"""`orchestrate --version`: the package version and the git commit (or "unknown" outside a checkout)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_version_names_package_and_commit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"orchestrate (\S+) \(git (\S+)\)\n", out.stdout)
    assert m and m.group(1) == "0.1.0" and head[:7] in m.group(2), out.stdout


def test_version_outside_a_checkout_says_unknown(tmp_path):
    shutil.copytree(REPO / "orchestrator", tmp_path / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main(['--version'])"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert out.returncode == 0 and out.stdout.endswith("(git unknown)\n"), out.stdout + out.stderr
