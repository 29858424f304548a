"""Turn (runs x stages still to do) into job arrays with dependencies.

One job array per (stage, resource spec), chunked to the cluster's ``MaxArraySize``.
A stage array depends on the arrays of the stages it needs:

* ``aftercorr`` when the parent array holds exactly the same runs in the same order —
  element *i* waits only for parent element *i*, so one failed run does not cancel the
  children of all the others (the usual case: every stage runs over the same runs);
* ``afterok`` on the whole parent array otherwise (e.g. a retry that reruns a parent
  stage for a subset of runs).

Parents that already finished (in the database) impose no dependency; a parent another run
of the same plan produces (a ``shared`` step: same stage identity) is depended on there.

Every plan also carries the per-run, per-stage :class:`~orchestrator.decide.Step` (``reuse``
from which directory / sweep, ``run``, ``re-run`` / ``extend`` with the reason): what
``submit --dry-run`` shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.sweep import Resources, RunSpec, Sweep
from orchestrator.slurm import chunks


@dataclass
class ArrayPlan:
    index: int
    stage: str
    resources: Resources
    runs: list[str]  # run hashes, in array-element order
    depends_on: list[tuple[int, str]] = field(default_factory=list)  # (parent array index, afterok|aftercorr)
    job_id: str | None = None  # filled in by the submitter

    def to_dict(self) -> dict:
        return {"index": self.index, "stage": self.stage, "size": len(self.runs), "runs": self.runs,
                "resources": self.resources.model_dump(), "job_id": self.job_id,
                "depends_on": [{"array": i, "type": kind} for i, kind in self.depends_on]}


@dataclass
class Plan:
    sweep: str
    runs: dict[str, RunSpec]  # run_hash -> run, only runs with something to do
    todo: dict[str, list[str]]  # run_hash -> stages to run (dependency order)
    skipped: list[str]  # run hashes with nothing to do
    arrays: list[ArrayPlan]
    stage_needs: dict[str, list[str]]
    steps: dict[str, dict] = field(default_factory=dict)  # run_hash -> {stage: decide.Step}, every run considered
    considered: dict[str, RunSpec] = field(default_factory=dict)  # every run the plan was made for

    @property
    def sbatch_calls(self) -> int:
        return len(self.arrays)

    def to_dict(self) -> dict:
        return {
            "sweep": self.sweep,
            "runs": [{"run_hash": h, "label": r.label, "params": r.params, "stages": self.todo[h],
                      "steps": {st: s.to_dict() for st, s in self.steps.get(h, {}).items()}}
                     for h, r in self.runs.items()],
            "skipped": self.skipped,
            "skipped_steps": {h: {st: s.to_dict() for st, s in self.steps[h].items()}
                              for h in self.skipped if h in self.steps},
            "actions": self.counts(),
            "arrays": [a.to_dict() for a in self.arrays],
            "sbatch_calls": self.sbatch_calls,
        }

    def counts(self) -> dict[str, dict[str, int]]:
        """stage -> {action: number of runs}."""
        out: dict[str, dict[str, int]] = {}
        for mine in self.steps.values():
            for st, s in mine.items():
                out.setdefault(st, {}).setdefault(s.action, 0)
                out[st][s.action] += 1
        return out

    def describe(self, every_run: bool = True) -> str:
        """Human-readable plan for ``--dry-run``: per stage the count of each action, then per
        run and stage what happens and why (a stage reused elsewhere is named with its source)."""
        lines = [f"sweep {self.sweep}: {len(self.runs)} runs to submit, {len(self.skipped)} with nothing to run"]
        for st, by in self.counts().items():
            lines.append(f"  {st}: " + ", ".join(f"{n} {a}" for a, n in sorted(by.items())))
        for h, mine in self.steps.items() if every_run else ():
            if all(s.action == "reuse" for s in mine.values()):
                continue  # counted above; --json lists them
            label = self.considered[h].label if h in self.considered else ""
            lines.append(f"  run {h} {label}".rstrip())
            for st, s in mine.items():
                lines.append(f"    {st}: {s.action} ({s.reason})")
        for a in self.arrays:
            deps = ", ".join(f"{kind}:array{i}" for i, kind in a.depends_on) or "none"
            res = a.resources
            lines.append(f"  array{a.index}: stage {a.stage}, {len(a.runs)} elements, partition={res.partition} "
                         f"cpus={res.cpus} gpus={res.gpus} mem={res.mem_gb}GB time={res.time_min}min; "
                         f"depends on {deps}")
        lines.append(f"sbatch calls: {self.sbatch_calls}")
        return "\n".join(lines)


def stages_to_run(order: list[str], needs: dict[str, list[str]], done: set[str], redo: set[str] | None = None) -> list[str]:
    """Stages of one run still to do: not ``done``, or in ``redo``, plus everything downstream of those."""
    todo: list[str] = []
    for stage in order:
        if stage not in done or (redo and stage in redo) or any(n in todo for n in needs[stage]):
            todo.append(stage)
    return todo


def build_plan(sweep: Sweep, todo: dict[str, list[str]], runs: list[RunSpec], max_array_size: int,
               steps: dict[str, dict] | None = None) -> Plan:
    """Group (run, stage) pairs into arrays, chunk them, and link stage dependencies.

    Parameters
    ----------
    sweep : the validated sweep (stage order, needs and resources).
    todo : run_hash -> stages to run for that run (from :func:`stages_to_run`); runs
        missing or with an empty list are skipped.
    runs : the runs, in grid order (array elements follow it).
    max_array_size : Slurm ``MaxArraySize``; an array holds at most this many elements.
    steps : run_hash -> {stage: decide.Step}: a ``shared`` parent is produced by another run.
    """
    steps = steps or {}
    spec = sweep.spec
    needs = {s: list(spec.stages[s].needs) for s in sweep.stage_order}
    active = [r for r in runs if todo.get(r.run_hash)]
    arrays: list[ArrayPlan] = []
    where: dict[tuple[str, str], int] = {}  # (run_hash, stage) -> array index
    for stage in sweep.stage_order:
        members = [r.run_hash for r in active if stage in todo[r.run_hash]]
        # one group per resource spec (today a stage has one spec; the key keeps this general)
        groups: dict[str, list[str]] = {}
        key = spec.stages[stage].resources.key()
        for h in members:
            groups.setdefault(key, []).append(h)
        for hashes in groups.values():
            for chunk in chunks(hashes, max_array_size):
                arr = ArrayPlan(index=len(arrays), stage=stage, resources=spec.stages[stage].resources, runs=chunk)
                for need in needs[stage]:
                    producers = [_producer(steps, h, need) for h in chunk]
                    parents = sorted({where[p] for p in producers if p in where})
                    if len(parents) == 1 and arrays[parents[0]].runs == chunk:
                        arr.depends_on.append((parents[0], "aftercorr"))
                    else:
                        arr.depends_on.extend((p, "afterok") for p in parents)
                for h in chunk:
                    where[(h, stage)] = arr.index
                arrays.append(arr)
    return Plan(
        steps=steps,
        considered={r.run_hash: r for r in runs},
        sweep=sweep.name,
        runs={r.run_hash: r for r in active},
        todo={r.run_hash: todo[r.run_hash] for r in active},
        skipped=[r.run_hash for r in runs if not todo.get(r.run_hash)],
        arrays=arrays,
        stage_needs=needs,
    )


def _producer(steps: dict[str, dict], h: str, stage: str) -> tuple[str, str]:
    """The (run, stage) whose job produces ``stage`` of run ``h`` in this plan."""
    step = steps.get(h, {}).get(stage)
    return step.source if step is not None and step.action == "shared" else (h, stage)
