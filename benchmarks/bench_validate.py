"""Benchmark: validation and `submit --dry-run` of a 1,000-run x 2-stage grid, old code vs new, side by side.

    .venv/bin/python benchmarks/bench_validate.py [--old /tmp/base] [--repeat 3]

Each measurement is a fresh process (what a user waits for), median of ``--repeat``:

* ``validate``: import ``orchestrator.sweep`` + ``load_sweep`` (schema, stage graph, every run
  through ``core.config.load_config``); also says whether torch got imported;
* ``dry-run``: ``python -m orchestrator.cli submit GRID --dry-run`` (no database yet).

``--old`` is a checkout of the previous code (run with ``python -m`` from its folder, so its
packages shadow the installed ones).  Goal (issue 11): dry-run <= 0.7 s, validation small.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VALIDATE = ("import sys, time; t = time.perf_counter(); from orchestrator.sweep import load_sweep; "
            "s = load_sweep(sys.argv[1]); print(time.perf_counter() - t, len(s.runs), 'torch' in sys.modules)")


def write_grid(folder: Path, executor: str) -> Path:
    """The grid of benchmarks/bench_submit.py: 10 x 10 x 5 x 2 seeds = 1,000 runs, 2 stages."""
    res = {"cpus": 1, "mem_gb": 0.25, "time_min": 10}
    doc = {
        "name": "bench1000",
        "base": {"data": {"image_size": 32}, "train": {"steps": 2}},
        "axes": {"loss.ssl": [0.01 * (i + 1) for i in range(10)], "optim.lr": [1e-4 * (i + 1) for i in range(10)],
                 "model.patch_size": [8, 4, 2, 1, 16]},
        "seeds": [0, 1],
        "stages": {"selftest": {"needs": [], "resources": res}, "echo": {"needs": ["selftest"], "resources": res}},
        "executor": executor,
        "runs_dir": str(folder / "runs"),
    }
    path = folder / "bench1000.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def timed(cmd: list[str], cwd: Path, repeat: int) -> tuple[float, float, str]:
    """Median wall time and median CPU time (user + sys) of ``repeat`` fresh processes.  On a
    shared machine the CPU time is the steadier number (wall time includes waiting for a core)."""
    walls, cpus, out = [], [], ""
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{p.stderr[-2000:]}")
        out = p.stdout
    return statistics.median(walls), statistics.median(cpus), out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="/tmp/base", help="checkout of the previous code ('' to skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--executor", default="slurm" if shutil.which("sbatch") else "local")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_validate_"))
    grid = write_grid(folder, args.executor)
    trees = [("new", REPO)] + ([("old", Path(args.old))] if args.old else [])
    print(f"grid: 1,000 runs x 2 stages, executor {args.executor}; median of {args.repeat} fresh processes; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'code':5} {'validate (s)':>13} {'torch':>6} {'validate process wall/cpu (s)':>30} "
          f"{'dry-run wall/cpu (s)':>21}")
    for name, tree in trees:
        vw, vc, out = timed([sys.executable, "-c", VALIDATE, str(grid)], tree, args.repeat)
        inner, runs, torch = out.split()
        dw, dc, _ = timed([sys.executable, "-m", "orchestrator.cli", "submit", str(grid), "--dry-run",
                           "--db", f"sqlite:///{folder}/none.db"], tree, args.repeat)
        print(f"{name:5} {float(inner):13.2f} {torch:>6} {vw:19.2f} / {vc:5.2f} {dw:13.2f} / {dc:5.2f}"
              f"   ({runs} runs)")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
