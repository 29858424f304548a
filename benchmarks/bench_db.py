"""Results-database benchmark (SQLite by default; any URL with --db).

1. ingest N result files (N runs x 1 stage, 10 metrics each), files/s;
2. the one-row-per-run summary query (``runs_table``) over N runs x 10 metrics;
3. ``orchestrate status`` over N runs (counts + per-run table, printed to a sink).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_db.py [--runs 10000] [--db URL]

Goals (issue 5): ingest >= 2,000 files/s, summary <= 0.5 s on SQLite.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from core.config import config_dict, load_config
from orchestrator.db import Store
from orchestrator.ingest import ingest
from orchestrator.query import runs_table
from orchestrator.results import make_payload, result_path

METRICS = ["psnr", "ssim", "lpips", "rfid", "probe_acc_before", "probe_acc_after", "structure_loss",
           "train_loss", "gflops_total", "train_time_s"]


def write_files(root: Path, n: int) -> None:
    base = config_dict(load_config())
    for i in range(n):
        cfg = dict(base, train={**base["train"], "seed": i})  # distinct config per run
        run_hash = f"{i:016x}"
        payload = make_payload(
            run_hash=run_hash, sweep=f"bench{i % 4}", stage="evaluate", attempt=1, status="finished",
            started_at="2026-01-01T00:00:00+00:00", ended_at="2026-01-01T00:10:00+00:00", config=cfg,
            params={"train.seed": i, "loss.ssl": 0.1 * (i % 5)}, host="node01",
            metrics=[{"name": m, "value": float(i + k), "step": 200, "backbone": "embedded-featnet-v1",
                      "num_samples": 512} for k, m in enumerate(METRICS)],
        )
        # Plain writes: the per-file fsync of write_result_file costs ~20 ms on this disk and is
        # not what is measured here.
        path = result_path(root / payload["sweep"] / run_hash, "evaluate", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, sort_keys=True))


class Timer:
    """Wall and CPU seconds of a block: on a shared machine the wall time includes waiting for a core."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c

    def __str__(self):
        return f"{self.wall:.3f}s wall, {self.cpu:.3f}s cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--db", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        t = time.perf_counter()
        write_files(root, args.runs)
        print(f"wrote {args.runs} result files in {time.perf_counter() - t:.1f}s")
        url = args.db or f"sqlite:///{tmp}/bench.db"
        store = Store(url)
        store.upgrade()

        with Timer() as t:
            report = ingest(store, [root])
        assert report.loaded == args.runs and not report.errors, report.summary()
        print(f"ingest: {args.runs} files: {t} = {args.runs / t.wall:,.0f} files/s wall, "
              f"{args.runs / t.cpu:,.0f} files/s cpu")
        with Timer() as t:
            report = ingest(store, [root])
        print(f"re-ingest (all duplicates): {t} = {args.runs / t.wall:,.0f} files/s wall ({report.summary()})")

        for _ in range(3):
            with Timer() as t:
                df = runs_table(store)
            print(f"summary runs_table: {df.shape[0]} rows x {df.shape[1]} cols: {t}")
        with Timer() as t:
            df = runs_table(store, metrics=["psnr", "rfid"], sweep="bench1")
        print(f"summary runs_table(sweep, 2 metrics): {df.shape}: {t}")

        from orchestrator.cli import main as cli

        for argv in (["status", "--no-refresh", "--limit", "0"], ["status", "--no-refresh"], ["status"]):
            with Timer() as t, redirect_stdout(io.StringIO()):
                rc = cli([*argv, "--db", url])
            print(f"orchestrate {' '.join(argv)} over {args.runs} runs: rc={rc} {t}")
        store.dispose()


if __name__ == "__main__":
    main()
