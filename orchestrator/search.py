"""Optuna search mode: the orchestrator drives the study by ask/tell.

Each round asks ``parallelism`` trials, turns each into a run (the base config with the
trial's values at the parameters' dotted keys), submits them through the same path as a
grid sweep (:func:`orchestrator.submit.submit_sweep`, any executor), waits, ingests, and
tells every trial the objective metric read back from the results database.  Jobs never
talk to Optuna; one driver process owns the study, which lives in the same database URL
(Optuna's own tables beside ours).

A trial whose config is impossible or whose run failed is told FAIL.  A trial that lands on
an already finished run (same config hash) reuses its result — nothing is resubmitted.
"""
from __future__ import annotations

from sqlalchemy import select

from core.config import ConfigError
from orchestrator.db.models import Metric, Run
from orchestrator.db.store import Store, with_driver
from orchestrator.sweep import RunSpec, Sweep, resolve_run


def make_study(store: Store, sweep: Sweep):
    """Create or load the study named after the sweep, stored at ``store.url``."""
    import optuna

    spec = sweep.spec.search
    # Optuna's tables and its own alembic_version live beside ours (we version ours in
    # models.VERSION_TABLE), so either may be created first.  Optuna builds its own engine:
    # hand it the URL with the installed driver (postgresql:// alone means psycopg 3 today).
    storage = optuna.storages.RDBStorage(with_driver(store.url))
    sampler = (optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.n_trials // 3)))
               if spec.sampler == "tpe" else optuna.samplers.RandomSampler(seed=spec.seed))
    return optuna.create_study(study_name=sweep.name, storage=storage, direction=spec.direction,
                               sampler=sampler, load_if_exists=True)


def objective_value(store: Store, run_hash: str, stage: str, name: str) -> float | None:
    """The metric ``name`` of ``stage`` at its last step for one run, or None."""
    q = (select(Metric.value).join(Run, Run.id == Metric.run_id)
         .where(Run.run_hash == run_hash, Metric.stage == stage, Metric.name == name)
         .order_by(Metric.step.desc().nulls_last(), Metric.id.desc()))
    with store.session() as s:
        return s.scalars(q).first()


def _trial_run(sweep: Sweep, trial) -> RunSpec:
    overrides = {}
    for name, p in sweep.spec.search.params.items():
        if p.type == "int":
            overrides[p.key] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            overrides[p.key] = trial.suggest_float(name, p.low, p.high, log=p.log)
    return resolve_run(sweep.spec, overrides, f"{sweep.path}: trial {trial.number}")


def run_search(store: Store, sweep: Sweep, executor: str | None = None, poll_s: float = 2.0) -> dict:
    """Run the sweep's ``search:`` block to ``n_trials`` finished trials (resumable).

    Returns
    -------
    ``{"study", "n_trials", "best_value", "best_params", "trials": [{number, params, value, state, run_hash}]}``
    """
    import optuna

    from orchestrator.submit import submit_sweep

    spec = sweep.spec.search
    stage = spec.stage or sweep.stage_order[-1]
    study = make_study(store, sweep)
    # Trials left RUNNING by an interrupted driver: their runs may have finished since.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        value = objective_value(store, t.user_attrs.get("run_hash", ""), stage, spec.objective)
        study.tell(t.number, value) if value is not None else study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    while (done := len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.FAIL)))) < spec.n_trials:
        batch = []
        for _ in range(min(spec.parallelism, spec.n_trials - done)):
            trial = study.ask()
            try:
                run = _trial_run(sweep, trial)
            except ConfigError as e:
                trial.set_user_attr("error", str(e))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            trial.set_user_attr("run_hash", run.run_hash)
            batch.append((trial, run))
        if batch:
            submit_sweep(store, sweep, executor=executor, wait=True, runs=[r for _, r in batch], poll_s=poll_s)
        for trial, run in batch:
            value = objective_value(store, run.run_hash, stage, spec.objective)
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, value)
    trials = [{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name,
               "run_hash": t.user_attrs.get("run_hash")} for t in study.get_trials(deepcopy=False)]
    best = study.best_trial if any(t["state"] == "COMPLETE" for t in trials) else None
    return {"study": study.study_name, "n_trials": len(trials), "best_value": best.value if best else None,
            "best_params": best.params if best else None, "trials": trials}
