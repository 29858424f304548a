"""The functions jobs run: one per stage, plus the wrapper that writes the result file.

A job knows only two strings: the stage name and the run's directory
``{runs_root}/{sweep}/{run_hash}``.  Everything else is read at job start from files
the orchestrator wrote before submission — ``config.yaml`` (resolved RunConfig) and
``run.json`` (run hash, sweep name, axis values, stage options) — so a requeued job never
reloads a stale state baked into its pickle.  Each attempt writes one immutable result
file via :func:`orchestrator.results.write_result_file`; jobs never open the database.

One run directory, one process: a stage holds an exclusive ``flock`` on
``{run_root}/{stage}/.lock`` (holder pid, host and start time written in it) from before it
picks its attempt number until its result file is written, on every executor.  A second
start of the same stage raises :class:`StageLocked` ("... is locked by pid P on H since T") and
writes nothing in the run directory (the lock is :mod:`core.dirlock`, shared with core).

A stage result is shared by every run (of any sweep) whose stage has the same identity
(:mod:`orchestrator.identity`): ``run.json`` may carry ``upstream: {stage: absolute dir}``
for parent stages whose result lives in another run's directory, and the stage functions
read their inputs from there; ``extend_from: {generator: dir}`` starts this run's generator
from another run's finished, shorter one (:func:`_seed_extension`).

Run as a subprocess (the ``local`` executor): ``python -m orchestrator.stages STAGE RUN_ROOT``.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import submitit
import yaml

from core import dirlock
from core.config import RunConfig, load_config
from orchestrator import builtin_stages as builtin
from orchestrator.results import make_payload, result_path, write_result_file

LOG_TAIL_LINES = 40


@dataclass
class StageContext:
    stage: str
    run_root: Path
    out_dir: Path  # {run_root}/{stage}
    tree: dict  # config.yaml as a plain dict (the resolved config)
    run: dict  # run.json
    params: dict  # this stage's options from the sweep file
    attempt: int
    _config: RunConfig | None = field(default=None, repr=False)

    @property
    def config(self) -> RunConfig:
        # Built on first use: validating a RunConfig imports the model code (torch), which
        # the built-in stages do not need.
        if self._config is None:
            self._config = load_config(self.tree, origin=str(self.run_root / "config.yaml"))
        return self._config


# ----------------------------------------------------------------------------- stages


def _core_result(res: dict | None, resumed_from: str | None) -> dict:
    res = res or {}
    info = {**res.get("info", {}), "resumed_from": resumed_from}
    return {"metrics": res.get("metrics", []), "artifacts": res.get("artifacts", []), "info": info}


def _latest_checkpoint(out_dir: Path) -> str | None:
    """Name of the newest ``step_*`` checkpoint the core entry will resume from (None: fresh start)."""
    steps = sorted((out_dir / "checkpoints").glob("step_*"))
    return steps[-1].name if steps else None


def stage_dir(ctx: StageContext, stage: str) -> Path:
    """Output directory of another stage of this run: where ``run.json`` says it was run
    (a run shared with an earlier sweep), else beside this stage."""
    upstream = ctx.run.get("upstream") or {}
    return Path(upstream[stage]) if stage in upstream else ctx.run_root / stage


def _tokenizer_dir(ctx: StageContext) -> Path:
    """The tokenizer that evaluation and generation use: the fine-tuned one when the sweep
    has a ``finetune`` stage (phase 2), else the joint-training one."""
    return stage_dir(ctx, "finetune" if "finetune" in ctx.run.get("stages", {}) else "tokenizer")


def tokenizer_stage(ctx: StageContext) -> dict:
    from core.config import joint_phase
    from core.train import train  # lazy: jobs of other stages never import torch models

    resumed_from = _latest_checkpoint(ctx.out_dir)
    return _core_result(train(joint_phase(ctx.config), ctx.out_dir), resumed_from)


def finetune_stage(ctx: StageContext) -> dict:
    from core.config import finetune_phase
    from core.train import train

    resumed_from = _latest_checkpoint(ctx.out_dir)
    cfg = finetune_phase(ctx.config, stage_dir(ctx, "tokenizer"))
    return _core_result(train(cfg, ctx.out_dir), resumed_from)


def evaluate_stage(ctx: StageContext) -> dict:
    from core.evaluate import evaluate

    return _core_result(evaluate(ctx.config, _tokenizer_dir(ctx), ctx.out_dir), None)


def _seed_extension(src: Path, out_dir: Path, tree: dict) -> None:
    """Start ``out_dir`` as a copy of the finished generator ``src`` (hard links: checkpoints and
    latents are large), so that core continues it from its last checkpoint to this run's length
    (``extend`` in the plan; ``core.stage.LENGTH_KEYS``).  ``config.yaml`` is this run's config at
    ``src``'s length: the stage identity says the two differ in nothing the generator reads."""
    import shutil

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = out_dir.with_name(out_dir.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("checkpoints", "latents_train"):
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name, copy_function=link)
    for name in ("latent_stats.pt", "result.json", "log.jsonl", "samples.png"):
        if (src / name).is_file():
            (shutil.copy2 if name == "log.jsonl" else link)(str(src / name), str(tmp / name))
    held = yaml.safe_load((src / "config.yaml").read_text())
    mine = json.loads(json.dumps(tree))
    mine["generator"]["steps"], mine["generator"]["eval_at"] = held["generator"]["steps"], held["generator"]["eval_at"]
    (tmp / "config.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))
    for p in tmp.iterdir():  # the stage lock lives in out_dir already: move the contents in
        os.replace(p, out_dir / p.name)
    tmp.rmdir()


def generator_stage(ctx: StageContext) -> dict:
    from core.generate import generate

    src = (ctx.run.get("extend_from") or {}).get("generator")
    if src and not (ctx.out_dir / "config.yaml").exists():
        _seed_extension(Path(src), ctx.out_dir, ctx.tree)
    resumed_from = _latest_checkpoint(ctx.out_dir)
    return _core_result(generate(ctx.config, _tokenizer_dir(ctx), ctx.out_dir), resumed_from)


# the core entry point each stage imports when it runs (lazily: jobs of other stages never
# import torch models); :func:`preload` imports them ahead of a fork
CORE_ENTRY = {"tokenizer": "core.train", "finetune": "core.train", "evaluate": "core.evaluate",
              "generator": "core.generate"}


def preload(stages) -> None:
    """Import the core entry points of ``stages`` in this process.  The local executor calls it
    before it forks its tasks, so the tasks share one import of torch and the core (~4 CPU s
    on the 2-core reference machine) instead of each paying it: 72 times in the quickstart."""
    for module in sorted({CORE_ENTRY[s] for s in stages if s in CORE_ENTRY}):
        importlib.import_module(module)


STAGES: dict[str, Callable[[StageContext], dict]] = {
    "tokenizer": tokenizer_stage,
    "finetune": finetune_stage,
    "evaluate": evaluate_stage,
    "generator": generator_stage,
    "echo": builtin.echo_stage,
    "selftest": builtin.selftest_stage,
}


# ----------------------------------------------------------------------------- wrapper


def next_attempt(run_root: Path, stage: str) -> int:
    """1 + the highest attempt already written for this stage (retries and requeues count)."""
    n = 1
    while result_path(run_root, stage, n).exists():
        n += 1
    return n


def queued_states(runs_root: Path, items: list[tuple[str, str, str | None]]) -> dict[tuple[str, str], dict]:
    """``store.set_states`` fields for (run_hash, stage, job id or None) just queued: the attempt
    recorded is the one the job will write (1 + the highest result file)."""
    out, root = {}, str(runs_root)
    for h, st, jid in items:
        # a new run has no results/ yet (checked with one stat, no Path objects: 2,000 stages)
        attempt = next_attempt(runs_root / h, st) if os.path.isdir(os.path.join(root, h, "results")) else 1
        out[(h, st)] = {"status": "queued", "attempt": attempt, "slurm_job_id": jid, "error_tail": None}
    return out


def _log_file() -> Path | None:
    """This job's stderr: the local executor says where; under submitit ask its environment."""
    if os.environ.get("ORCHESTRATE_LOG"):
        return Path(os.environ["ORCHESTRATE_LOG"])
    try:
        return submitit.JobEnvironment().paths.stderr
    except RuntimeError:  # not inside a submitit job
        return None


def log_tail(path: Path | None, n: int = LOG_TAIL_LINES) -> str | None:
    """The last ``n`` lines of a log file (None when there is none)."""
    if path is None or not path.exists():
        return None
    sys.stderr.flush()
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _slurm_ids() -> tuple[str | None, str | None]:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}", array
    return os.environ.get("SLURM_JOB_ID"), None


def _write(run_root: Path, run: dict, stage: str, attempt: int, status: str, started: datetime,
           config: dict, body: dict, error: dict | None = None) -> Path:
    job_id, array_id = _slurm_ids()
    info = dict(body.get("info") or {})
    info["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    payload = make_payload(
        run_hash=run["run_hash"], sweep=run["sweep"], stage=stage, attempt=attempt, status=status,
        started_at=started, ended_at=datetime.now(timezone.utc), config=config, params=run.get("params", {}),
        metrics=body.get("metrics"), artifacts=body.get("artifacts"), error=error, host=socket.gethostname(),
        git_commit=run.get("git_commit"), executor=os.environ.get("ORCHESTRATE_EXECUTOR", run.get("executor")),
        slurm_job_id=job_id, slurm_array_id=array_id, info=info,
    )
    return write_result_file(run_root, stage, attempt, payload)


def read_run(run_root: str | Path) -> tuple[dict, dict]:
    """``run.json`` and ``config.yaml`` (as a dict) of a run directory."""
    run_root = Path(run_root)
    run = json.loads((run_root / "run.json").read_text())
    return run, yaml.safe_load((run_root / "config.yaml").read_text())


# Stages whose core entry point runs data-parallel: a Slurm job with N GPUs gets N tasks (ranks).
DISTRIBUTED_STAGES = ("tokenizer", "finetune", "generator")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


StageLocked = dirlock.DirLocked  # another process runs this stage of this run


def lock_path(run_root: str | Path, stage: str) -> Path:
    return Path(run_root) / stage / dirlock.LOCK_FILE


def acquire_stage_lock(run_root: str | Path, stage: str) -> int:
    """Take the stage's lock (:mod:`core.dirlock` on ``{run_root}/{stage}``, the directory core's
    own run-directory lock guards); returns the fd that holds it.  Raises :class:`StageLocked`
    naming the holder when another process has it."""
    return dirlock.acquire(Path(run_root) / stage)


def lock_holder(run_root: str | Path, stage: str) -> str | None:
    """Who holds the stage's lock now (None: nobody)."""
    return dirlock.holder(Path(run_root) / stage)


def run_stage(stage: str, run_root: str | Path) -> str:
    """Run one stage of one run and write its result file; re-raise the stage's exception.

    Returns the path of the result file (a string, cheap to pickle back). In a multi-task
    (DDP) job every rank runs the stage and only rank 0 writes the result file.
    """
    run_root = Path(run_root)
    started = datetime.now(timezone.utc)
    run, tree = read_run(run_root)
    out_dir = run_root / stage
    if _rank() != 0:  # rank 0 holds the lock for the whole (multi-rank) job
        attempt = next_attempt(run_root, stage)
        STAGES[stage](StageContext(stage, run_root, out_dir, tree, run, run.get("stages", {}).get(stage, {}), attempt))
        return ""
    lock = acquire_stage_lock(run_root, stage)  # before the attempt number: two starts never share one
    try:
        attempt = next_attempt(run_root, stage)
        ctx = StageContext(stage, run_root, out_dir, tree, run, run.get("stages", {}).get(stage, {}), attempt)
        try:
            body = STAGES[stage](ctx)
        except Exception as e:
            traceback.print_exc()
            error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc(),
                     "log_tail": log_tail(_log_file())}
            _write(run_root, run, stage, attempt, "failed", started, tree, {}, error)
            raise
        return str(_write(run_root, run, stage, attempt, "finished", started, tree, body))
    finally:
        os.close(lock)


class StageTask(submitit.helpers.Checkpointable):
    """What a Slurm array element runs: pickles only the stage name and the run directory.

    On preemption / time-out submitit calls :meth:`checkpoint` (in the job, from the
    USR2 handler): it records a ``preempted`` result (so attempts are counted) and
    requeues a *fresh* task; the stage function finds its latest checkpoint on restart.
    """

    def __init__(self, stage: str, run_root: str):
        self.stage = stage
        self.run_root = str(run_root)

    def __call__(self) -> str:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT from the Slurm task layout, as core resolves
            # them, exporting only those not set: submitit's export() raises on set ones and pins
            # CUDA_VISIBLE_DEVICES to the local rank (wrong where Slurm binds one GPU per task).
            from core.trainer.launch import torch_env  # lazy: torch, for distributed stages only

            os.environ.update(torch_env())
        return run_stage(self.stage, self.run_root)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        run_root = Path(self.run_root)
        try:
            if _rank() == 0:  # one preempted record per attempt, not one per DDP rank
                run, tree = read_run(run_root)
                now = datetime.now(timezone.utc)
                _write(run_root, run, self.stage, next_attempt(run_root, self.stage), "preempted", now,
                       tree, {"info": {"reason": "preempted or timed out; requeued"}})
        except Exception:  # never block the requeue on bookkeeping
            traceback.print_exc()
        return submitit.helpers.DelayedSubmission(StageTask(self.stage, self.run_root))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in STAGES:
        print(f"usage: python -m orchestrator.stages {{{','.join(STAGES)}}} RUN_ROOT", file=sys.stderr)
        return 2
    try:
        run_stage(argv[0], argv[1])
    except StageLocked as e:
        print(f"orchestrate: {e}", file=sys.stderr)
        return 1
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
