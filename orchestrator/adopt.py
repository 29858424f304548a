"""Adopt runs recorded before stage identities (schema revision 0005).

Migration 0005 adds the columns; this fills them with the code that will plan, since an
identity is a function of the stage declarations (:mod:`orchestrator.identity`), not of the
schema.  Each such run keeps its ``run_hash`` (its directory) and gets its ``run_key`` (the
hash of its non-default config: a later submission of the same grid point finds it) and, per
stage, the identity, inputs, length and directory of the result it holds (where its result
file was ingested from).  Nothing is re-run, no metric is touched.

Run by ``orchestrate db upgrade`` and, for rows an ingest created since, by every ``submit``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml
from sqlalchemy import or_, select

from core.config import ConfigError, load_config
from orchestrator.db.models import IngestedFile, Run, RunStage, Sweep as SweepRow
from orchestrator.db.store import Store
from orchestrator.identity import STAGES, canonical, digest, stage_keys
from orchestrator.db.writes import _chunks, bulk_update
from orchestrator.sweep import SweepFile, _topo_order


def _graph(spec_yaml: str | None) -> tuple[list[str], dict, dict, Path | None] | None:
    """(stage order, needs, params, runs_root parent) from the sweep spec stored at submission."""
    if not spec_yaml:
        return None
    try:
        spec = SweepFile.model_validate(yaml.safe_load(spec_yaml))
    except Exception:  # a spec this code no longer reads: the run keeps no identity
        return None
    errors: list[str] = []
    order = _topo_order(spec.stages, "stored spec", errors)
    if errors:
        return None
    return (order, {s: list(spec.stages[s].needs) for s in order}, {s: spec.stages[s].params for s in order},
            Path(spec.runs_dir))


def adopt(store: Store) -> int:
    """Fill run keys and stage identities missing in the database; returns the runs adopted."""
    pending = (select(Run.id).where(or_(Run.run_key.is_(None), Run.id.in_(
        select(RunStage.run_id).where(RunStage.identity.is_(None), RunStage.source_id.is_(None))))))
    with store.session() as s:
        ids = list(s.scalars(pending.limit(1)))
        if not ids:
            return 0
        rows = s.execute(select(Run.id, Run.run_hash, Run.config, SweepRow.name, SweepRow.spec_yaml)
                         .join(SweepRow, SweepRow.id == Run.sweep_id).where(Run.id.in_(pending))).all()
        stages: dict[int, list] = {}
        files: dict[tuple[str, str], tuple[int, str]] = {}
        for part in _chunks([r.id for r in rows]):
            for st in s.execute(select(RunStage.id, RunStage.run_id, RunStage.stage).where(RunStage.run_id.in_(part))):
                stages.setdefault(st.run_id, []).append(st)
        for part in _chunks([r.run_hash for r in rows]):
            for h, stage, attempt, path in s.execute(select(IngestedFile.run_hash, IngestedFile.stage,
                                                            IngestedFile.attempt, IngestedFile.path)
                                                     .where(IngestedFile.run_hash.in_(part))):
                if files.get((h, stage), (0, ""))[0] < attempt:
                    files[(h, stage)] = (attempt, path)
        graphs: dict[str, tuple | None] = {}
        run_updates, stage_updates, skipped = [], [], []
        for r in rows:
            try:
                tree = load_config(r.config, origin=f"run {r.run_hash}").model_dump(mode="json")
            except ConfigError as e:
                skipped.append(f"run {r.run_hash}: {str(e).splitlines()[0]}")
                continue
            flat = canonical(tree)
            run_updates.append({"id": r.id, "run_key": digest(flat)})
            if r.name not in graphs:
                graphs[r.name] = _graph(r.spec_yaml)
            graph = graphs[r.name]
            if graph is None:
                continue
            order, needs, params, runs_dir = graph
            if any(st not in STAGES for st in order):
                continue
            keys = stage_keys(flat, tree, order, needs, params)
            for st in stages.get(r.id, []):
                if st.stage not in keys:
                    continue
                k = keys[st.stage]
                found = files.get((r.run_hash, st.stage))
                where = (Path(found[1]).parent.parent / st.stage) if found else runs_dir / r.name / r.run_hash / st.stage
                stage_updates.append({"id": st.id, "identity": k.identity, "inputs": k.inputs,
                                      "length": k.length or None, "dir": str(where)})
        bulk_update(s, Run, run_updates)
        bulk_update(s, RunStage, stage_updates)
    for line in skipped:
        print(f"orchestrate: adopt: {line} (left without identity)", file=sys.stderr)
    return len(run_updates)
