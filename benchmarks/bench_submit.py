"""Benchmark: a 1,000-run grid through expand + validate + plan, Slurm submission, one status refresh.

    .venv/bin/python benchmarks/bench_submit.py [--runs-dir /tmp/bench_submit] [--no-slurm]

Goals (issue "orchestrator: YAML sweeps ..."): plan <= 1 s; sbatch calls = number of
(stage, resource spec) arrays; one status refresh <= 2 s.  The jobs are submitted held
(``sbatch --hold``) so that they never occupy the shared machine, and are cancelled at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import slurm  # noqa: E402
from orchestrator.plan import build_plan  # noqa: E402
from orchestrator.submit import cancel_sweep, decide, open_store, refresh_states, submit_sweep  # noqa: E402
from orchestrator.sweep import load_sweep  # noqa: E402


def write_grid(folder: Path) -> Path:
    res = {"cpus": 1, "mem_gb": 0.25, "time_min": 10, "extra": {"hold": True}}
    doc = {
        "name": "bench1000",
        "base": {"data": {"image_size": 32}, "train": {"steps": 2}},
        "axes": {"loss.ssl": [0.01 * (i + 1) for i in range(10)], "optim.lr": [1e-4 * (i + 1) for i in range(10)],
                 "model.patch_size": [8, 4, 2, 1, 16]},
        "seeds": [0, 1],  # 10 x 10 x 5 x 2 = 1000 runs
        "stages": {"selftest": {"needs": [], "resources": res}, "echo": {"needs": ["selftest"], "resources": res}},
        "executor": "slurm",
        "array_parallelism": 64,
        "runs_dir": str(folder / "runs"),
    }
    path = folder / "bench1000.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", default="/tmp/bench_submit")
    ap.add_argument("--no-slurm", action="store_true", help="only time expand + validate + plan")
    args = ap.parse_args()
    folder = Path(args.runs_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = write_grid(folder)

    load_sweep(path)  # warm-up: imports (torch, via the geometry check) are not part of the plan time
    t0 = time.perf_counter()
    sweep = load_sweep(path)
    t1 = time.perf_counter()
    plan = build_plan(sweep, decide(sweep, known={}), sweep.runs, slurm.max_array_size())
    t2 = time.perf_counter()
    print(f"runs: {len(sweep.runs)}  arrays planned: {plan.sbatch_calls}")
    print(f"expand + validate: {t1 - t0:.3f} s   plan: {t2 - t1:.3f} s   total: {t2 - t0:.3f} s  (goal <= 1 s)")
    if args.no_slurm or not slurm.available():
        print("Slurm not used" + ("" if args.no_slurm else " (not available)"))
        return 0

    store = open_store(f"sqlite:///{folder / 'bench.db'}")
    t0 = time.perf_counter()
    res = submit_sweep(store, sweep)
    t1 = time.perf_counter()
    array_ids = {j.split("_")[0] for j in res.job_ids.values()}
    print(f"submit (run dirs + DB + sbatch): {t1 - t0:.2f} s; sbatch calls (distinct array ids): "
          f"{len(array_ids)}; (stage, resource) arrays: {res.plan.sbatch_calls}; elements: {len(res.job_ids)}")
    try:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            counts = refresh_states(store, sweep.name)
            times.append(time.perf_counter() - t0)
        print(f"status refresh (ingest scan + 1 sacct + DB): {min(times):.3f} s best of 3, "
              f"first {times[0]:.3f} s; counts {counts}  (goal <= 2 s)")
    finally:
        t0 = time.perf_counter()
        cancel_sweep(store, sweep.name)
        print(f"cancel: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
