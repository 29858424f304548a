"""Benchmark: a 1,000-run x 2-stage grid submitted to the real local Slurm, side by side with
raw submitit ``map_array`` of the same 2,000 elements, in one run.

    .venv/bin/python benchmarks/bench_submit.py [--runs-dir /tmp/bench_submit] [--no-slurm]

Timed in this process (imports done once before): ``submit`` = validate (load_sweep) +
stage identities + reuse decisions + plan + run dirs + database + journal + 2 sbatch calls;
``--dry-run`` = validate + plan; one status refresh (journals + ingest scan + 1 sacct + DB);
the ``status`` command; a re-submit with nothing to do.  Goals (issue 16): submit <= 2x raw
submitit, ``status`` <= 0.5 s (issue 11: dry-run <= 0.7 s).  Every
job is submitted held (``sbatch --hold``) so that none occupies the shared machine, and all
are cancelled at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import slurm  # noqa: E402
from orchestrator.reconcile import cancel_sweep, refresh_states  # noqa: E402
from orchestrator.stages import StageTask  # noqa: E402
from orchestrator.submit import open_store, submit_sweep  # noqa: E402
from orchestrator.sweep import load_sweep  # noqa: E402

RES = {"cpus": 1, "mem_gb": 0.25, "time_min": 10, "extra": {"hold": True}}


def write_grid(folder: Path) -> Path:
    doc = {
        "name": "bench1000",
        "base": {"data": {"image_size": 32}, "train": {"steps": 2}},
        "axes": {"loss.ssl": [0.01 * (i + 1) for i in range(10)], "optim.lr": [1e-4 * (i + 1) for i in range(10)],
                 "model.patch_size": [8, 4, 2, 1, 16]},
        "seeds": [0, 1],  # 10 x 10 x 5 x 2 = 1000 runs
        "stages": {"selftest": {"needs": [], "resources": RES}, "echo": {"needs": ["selftest"], "resources": RES}},
        "executor": "slurm",
        "array_parallelism": 64,
        "runs_dir": str(folder / "runs"),
    }
    path = folder / "bench1000.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def raw_submitit(folder: Path, n: int, ids: list[str]) -> float:
    """The floor: submitit alone, two ``map_array`` calls of ``n`` tasks (aftercorr-linked);
    the array ids go to ``ids`` as soon as each exists (for the final scancel)."""
    import submitit

    ex = submitit.SlurmExecutor(folder=folder / "raw" / "%j")
    ex.update_parameters(time=10, cpus_per_task=1, mem="256MB", array_parallelism=64,
                         additional_parameters={"hold": True})
    tasks = [StageTask("echo", str(folder / "raw" / f"r{i}")) for i in range(n)]
    t0 = time.perf_counter()
    first = ex.map_array(lambda t: t(), tasks)
    ids.append(first[0].job_id.split("_")[0])
    ex.update_parameters(additional_parameters={"hold": True, "dependency": f"aftercorr:{ids[0]}"})
    second = ex.map_array(lambda t: t(), tasks)
    ids.append(second[0].job_id.split("_")[0])
    return time.perf_counter() - t0


def status_command(db: Path) -> int:
    """The ``status`` command in this process, its table printed to /dev/null."""
    import contextlib

    from orchestrator.cli import main as cli

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return cli(["status", "bench1000", "--db", f"sqlite:///{db}"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", default="/tmp/bench_submit")
    ap.add_argument("--no-slurm", action="store_true", help="only time validate + plan (the dry run)")
    args = ap.parse_args()
    folder = Path(args.runs_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = write_grid(folder)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    load_sweep(path)  # warm-up: imports are not part of the timings
    t0 = time.perf_counter()
    plan = submit_sweep(None, load_sweep(path), dry_run=True).plan
    print(f"dry run (validate + plan): {time.perf_counter() - t0:.3f} s for {len(plan.runs)} runs, "
          f"{plan.sbatch_calls} arrays  (goal <= 0.7 s)")
    if args.no_slurm or not slurm.available():
        print("Slurm not used" + ("" if args.no_slurm else " (not available)"))
        return 0

    store = open_store(f"sqlite:///{folder / 'bench.db'}")
    raw_ids: list[str] = []
    try:
        raw_s = raw_submitit(folder, len(plan.runs), raw_ids)
        t0 = time.perf_counter()
        res = submit_sweep(store, load_sweep(path))
        sub_s = time.perf_counter() - t0
        arrays = {j.split("_")[0] for j in res.job_ids.values()}
        print(f"raw submitit map_array x2 ({2 * len(plan.runs)} elements): {raw_s:.2f} s")
        print(f"submit (validate + record + run dirs + sbatch): {sub_s:.2f} s = {sub_s / raw_s:.1f}x raw; "
              f"{len(arrays)} sbatch calls, {len(res.job_ids)} elements  (goal <= 1 s)")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            counts = refresh_states(store, "bench1000")
            times.append(time.perf_counter() - t0)
        print(f"status refresh (journals + ingest scan + 1 sacct + DB): {min(times):.3f} s best of 3, "
              f"first {times[0]:.3f} s; {counts}  (goal <= 0.5 s)")
        status_command(folder / "bench.db")  # warm-up: the CLI's imports are not part of the timing
        t0 = time.perf_counter()
        status_rc = status_command(folder / "bench.db")
        print(f"`orchestrate status bench1000` (refresh + 1,000-run table): {time.perf_counter() - t0:.3f} s "
              f"(exit {status_rc})  (goal <= 0.5 s)")
        t0 = time.perf_counter()
        again = submit_sweep(store, load_sweep(path))
        print(f"re-submit (nothing to do): {time.perf_counter() - t0:.2f} s, {again.plan.sbatch_calls} sbatch calls")
    finally:
        t0 = time.perf_counter()
        cancel_sweep(store, "bench1000")
        if raw_ids:
            subprocess.run(["scancel", *raw_ids], capture_output=True)
        print(f"cancel: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
