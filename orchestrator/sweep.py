"""Sweep files: schema, validation and expansion into runs.

A sweep file names a base config (a core ``RunConfig`` tree), the axes to vary (a full
product, plus zipped groups varied together), seeds, the stages every run goes through
(with their dependencies and Slurm resources), the executor, and optionally an Optuna
``search:`` block.  :func:`load_sweep` validates *everything* — the file's own schema,
the stage graph and every expanded run's config — and raises one :class:`SweepError`
listing all problems, each naming the file, the run (its axis values) and the key.
Nothing is submitted and the database is not touched before that succeeds.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.config import ConfigError, RunConfig, config_dict, load_config
from orchestrator.cost import CostSpec
from orchestrator.executors import EXECUTORS  # the backends' registry: name -> class
from orchestrator.identity import digest_canonical
from orchestrator.sweep_checks import (YAMLBombError, control_char_errors, grid_size, has_control_char,
                                       load_yaml_bounded, stage_input_errors)

_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # an sbatch long option name
_HASH_RE = re.compile(r"^[0-9a-f]{16}$")
# check_geometry names its parameters bare; the dotted key is what the user edits.
_GEOMETRY_KEYS = {
    "image_size": "data.image_size",
    "patch_size": "model.patch_size",
    "encoder_size": "model.encoder_size",
    "decoder_size": "model.decoder_size",
    "split_depth": "model.split_depth",
    "latent_size": "model.latent_size",
}


class SweepError(ValueError):
    """All problems found in a sweep file, one per line (each names file, run and key)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = self.errors[:50]
        more = len(self.errors) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more errors" if more else ""))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """Slurm resources of one stage (one job array per stage and resource spec)."""

    partition: str | None = None
    gpus: int = Field(0, ge=0)
    cpus: int = Field(1, ge=1)
    mem_gb: float = Field(4, gt=0)
    time_min: int = Field(60, ge=1)
    account: str | None = None
    qos: str | None = None
    extra: dict[str, str | int | float | bool] = {}  # raw sbatch options, e.g. {constraint: a100}

    @field_validator("extra")
    @classmethod
    def _option_names(cls, v: dict) -> dict:
        bad = [k for k in v if not _OPTION_RE.match(k)]
        if bad:
            raise ValueError(f"sbatch option names must match {_OPTION_RE.pattern}, not {bad}")
        return v

    def key(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


class StageSpec(_Strict):
    needs: list[str] = []
    resources: Resources = Resources()
    params: dict[str, Any] = {}  # stage options (the built-in `selftest` stage reads these)


class SearchParam(_Strict):
    key: str  # dotted RunConfig key, e.g. loss.ssl
    low: float
    high: float
    log: bool = False
    type: Literal["float", "int"] = "float"


class SearchSpec(_Strict):
    params: dict[str, SearchParam] = Field(min_length=1)
    objective: str  # metric name
    stage: str | None = None  # stage that reports the objective; None = the last stage
    direction: Literal["minimize", "maximize"] = "minimize"
    n_trials: int = Field(ge=1)
    parallelism: int = Field(1, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0


class SweepFile(_Strict):
    """The sweep file's schema.

    ``runs_dir``: where runs are written, ``{runs_dir}/{name}/{run_hash}/``.  A relative path is
    relative to the folder holding the sweep file (never the current directory), so a sweep
    lands in the same place from wherever it is submitted; the shipped sweeps say ``../runs``
    (the repository's ``runs/``).  ``max_runs`` caps the grid (counted before expansion).
    ``preflight``: ``error`` (default) refuses to submit when a path the runs read (data root,
    weight files) is missing here; ``warn`` only warns (paths mounted on compute nodes only).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    base: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    zip: list[dict[str, list[Any]]] = []
    seeds: list[int] | None = None  # -> train.seed; None = keep the base seed
    stages: dict[str, StageSpec] = Field(min_length=1)
    executor: str = "local"  # a name in orchestrator.executors.EXECUTORS
    max_parallel: int = Field(1, ge=1)  # local executor: concurrent subprocesses
    array_parallelism: int = Field(64, ge=1)  # slurm: %N of each array
    runs_dir: str = Field("runs", min_length=1)  # relative to the sweep file's folder (see the docstring)
    max_runs: int = Field(10_000, ge=1)
    preflight: Literal["error", "warn"] = "error"
    search: SearchSpec | None = None
    cost: CostSpec = CostSpec()  # utilisation assumed by the --dry-run cost estimate (orchestrator.cost)

    @field_validator("name")
    @classmethod
    def _name_stays_inside(cls, v: str) -> str:
        if v in (".", ".."):  # {runs_dir}/{name} must be a folder inside runs_dir
            raise ValueError(f"sweep name {v!r} would leave runs_dir; use letters, digits, '_', '-', '.'")
        return v

    @field_validator("executor")
    @classmethod
    def _known_executor(cls, v: str) -> str:
        if v not in EXECUTORS:
            raise ValueError(f"unknown executor {v!r}; known: {', '.join(EXECUTORS)}")
        return v


@dataclass
class RunSpec:
    """One expanded grid point: its axis values, resolved config and identity
    (:func:`orchestrator.identity.run_key`; a run recorded before stage identities keeps
    its older hash, see :mod:`orchestrator.decide`)."""

    params: dict[str, Any]
    config: RunConfig
    run_hash: str
    label: str
    tree: dict[str, Any] | None = field(default=None, repr=False)  # config_dict(config), computed once
    canon: dict[str, Any] | None = field(default=None, repr=False)  # identity.canonical(tree), computed once

    def config_dict(self) -> dict[str, Any]:
        if self.tree is None:
            self.tree = config_dict(self.config)
        return self.tree


@dataclass
class Sweep:
    path: Path
    spec: SweepFile
    stage_order: list[str]
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def runs_root(self) -> Path:
        """``{runs_dir}/{sweep}``; a relative runs_dir is relative to the sweep file's folder."""
        root = Path(self.spec.runs_dir).expanduser()
        return (root if root.is_absolute() else self.path.parent / root).resolve() / self.name

    def run_dir(self, run_hash: str) -> Path:
        """``{runs_root}/{run_hash}``; refuses anything but a run hash (it could leave runs_root)."""
        if not _HASH_RE.match(run_hash):
            raise ValueError(f"{run_hash!r} is not a run hash (16 hex digits)")
        return self.runs_root / run_hash


def run_label(params: dict[str, Any]) -> str:
    return "[" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]" if params else "[base]"


def _fmt_validation(err: ValidationError, origin: str) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{origin}: key '{loc}': {msg}")
    return out


def _topo_order(stages: dict[str, StageSpec], origin: str, errors: list[str]) -> list[str]:
    """Stages in dependency order; missing dependencies and cycles are appended to ``errors``."""
    from orchestrator.slurm import cpus_per_task
    from orchestrator.stages import DISTRIBUTED_STAGES, STAGES

    for name, st in stages.items():
        if name not in STAGES:
            errors.append(f"{origin}: key 'stages.{name}': unknown stage; known stages: {sorted(STAGES)}")
        try:  # resources.cpus is per job: a distributed stage splits it over its ranks (one per GPU)
            res = st.resources
            cpus_per_task(res.cpus, res.gpus if name in DISTRIBUTED_STAGES and res.gpus else 1)
        except ValueError as e:
            errors.append(f"{origin}: key 'stages.{name}.resources.cpus': {e}")
        for need in st.needs:
            if need not in stages:
                errors.append(f"{origin}: key 'stages.{name}.needs': depends on missing stage '{need}'")
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(path[path.index(name):] + [name])
            errors.append(f"{origin}: key 'stages.{name}.needs': dependency cycle {cycle}")
            return
        state[name] = 1
        for need in stages[name].needs:
            if need in stages:
                visit(need, path + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _grid(spec: SweepFile) -> list[dict[str, Any]]:
    """Axis values of every grid point: product(axes) x product(zip groups) x seeds."""
    dims: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in spec.axes.items()]
    for group in spec.zip:
        keys = list(group)
        dims.append([dict(zip(keys, vals)) for vals in zip(*group.values())])
    if spec.seeds is not None:
        dims.append([{"train.seed": s} for s in spec.seeds])
    points = []
    for combo in itertools.product(*dims):
        point: dict[str, Any] = {}
        for d in combo:
            point.update(d)
        points.append(point)
    return points


def _config_error(msg: str, origin: str) -> str:
    """Make a core ConfigError name the dotted key (geometry errors name bare parameters)."""
    rest = msg[len(origin) + 2:] if msg.startswith(origin + ": ") else msg
    # a model-level validator's ValueError arrives as "key '<root>': Value error, ..."
    rest = re.sub(r"^key '<root>': (Value error, )?", "", rest)
    if rest.startswith("key '"):
        return f"{origin}: {rest}"
    m = re.match(r"(\w+)=", rest)
    key = _GEOMETRY_KEYS.get(m.group(1)) if m else None
    return f"{origin}: key '{key}': {rest}" if key else f"{origin}: {rest}"


def check_grid(spec: SweepFile, origin: str, errors: list[str]) -> None:
    """Empty axes, unequal zip groups, a key varied twice, search-mode conflicts."""
    seen: dict[str, str] = {}
    for key, vals in spec.axes.items():
        if not vals:
            errors.append(f"{origin}: key 'axes.{key}': empty axis (give at least one value)")
        seen[key] = f"axes.{key}"
    for i, group in enumerate(spec.zip):
        if not group:
            errors.append(f"{origin}: key 'zip[{i}]': empty zipped group")
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            errors.append(f"{origin}: key 'zip[{i}]': zipped lists have unequal lengths {lengths}")
        for key, vals in group.items():
            if not vals:
                errors.append(f"{origin}: key 'zip[{i}].{key}': empty axis (give at least one value)")
            if key in seen:
                errors.append(f"{origin}: key 'zip[{i}].{key}': already varied by {seen[key]}")
            seen[key] = f"zip[{i}].{key}"
    if spec.seeds is not None:
        if not spec.seeds:
            errors.append(f"{origin}: key 'seeds': empty list")
        if "train.seed" in seen:
            errors.append(f"{origin}: key 'seeds': train.seed is also varied by {seen['train.seed']}")
    if spec.search is not None:
        if spec.axes or spec.zip:
            errors.append(f"{origin}: key 'search': a search sweep takes no axes/zip (trials come from Optuna)")
        for name, p in spec.search.params.items():
            if p.low >= p.high:
                errors.append(f"{origin}: key 'search.params.{name}': low={p.low} must be < high={p.high}")
            if p.log and p.low <= 0:
                errors.append(f"{origin}: key 'search.params.{name}': log scale needs low > 0")
        if spec.search.stage is not None and spec.search.stage not in spec.stages:
            errors.append(f"{origin}: key 'search.stage': no stage named '{spec.search.stage}'")


def _with_sections(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with every config section present (``{}`` = its defaults): validating a section
    from a dict is 3x faster than pydantic deep-copying a default section instance, which
    dominated validating a 1,000-run grid.  The resolved config is the same."""
    return {**{k: {} for k in RunConfig.model_fields}, **base}


def resolve_run(spec: SweepFile, params: dict[str, Any], origin: str) -> RunSpec:
    """Build one run's config from the base and its axis values (raises ConfigError)."""
    label = run_label(params)
    cfg = load_config(_with_sections(spec.base), overrides=params, origin=f"{origin}: run {label}")
    tree = config_dict(cfg)
    key, canon = digest_canonical(tree)
    return RunSpec(params=dict(params), config=cfg, run_hash=key, label=label, tree=tree, canon=canon)


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file.

    Returns
    -------
    Sweep with ``runs`` (deduplicated by run hash, grid order) and ``stage_order``
    (dependencies first).  A search sweep has one run: the base config (trials are
    built later by :mod:`orchestrator.search`).

    Raises
    ------
    SweepError
        listing every problem: unknown keys / wrong types at any depth, empty axes,
        unequal zipped groups, missing or cyclic stage dependencies, and every run whose
        config is impossible (named by its axis values and the offending key).
    """
    path = Path(path)
    origin = str(path)
    try:
        raw = load_yaml_bounded(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, YAMLBombError) as e:
        raise SweepError([f"{origin}: cannot read sweep file: {e}"]) from None
    if not isinstance(raw, dict):
        raise SweepError([f"{origin}: top level must be a mapping"])
    errors = control_char_errors(raw, origin)
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise SweepError(errors + _fmt_validation(e, origin)) from None
    if errors:
        raise SweepError(errors)
    return build_sweep(spec, path)


def build_sweep(spec: SweepFile, path: Path) -> Sweep:
    """Validate a parsed sweep file (stage graph, grid, every run) and expand it."""
    origin = str(path)
    errors: list[str] = []
    order = _topo_order(spec.stages, origin, errors)
    if not errors:
        errors += stage_input_errors({k: list(v.needs) for k, v in spec.stages.items()}, origin)
    check_grid(spec, origin, errors)
    root = str(Sweep(path=path, spec=spec, stage_order=[]).runs_root)
    if has_control_char(root):  # e.g. a folder name with a newline: the path reaches sbatch's --output
        errors.append(f"{origin}: key 'runs_dir': resolves to {root!r}, which holds a control character")
    n = grid_size(spec.axes, spec.zip, spec.seeds)
    if n > spec.max_runs:
        errors.append(f"{origin}: key 'max_runs': the grid has {n:,} points, more than max_runs={spec.max_runs:,} "
                      f"(raise max_runs if you mean it)")
    if errors:  # the grid itself is malformed: expanding it would only add noise
        raise SweepError(errors)
    runs: dict[str, RunSpec] = {}
    for params in _grid(spec):
        try:
            run = resolve_run(spec, params, origin)
        except ConfigError as e:
            for line in str(e).splitlines():
                errors.append(_config_error(line, f"{origin}: run {run_label(params)}"))
            continue
        runs.setdefault(run.run_hash, run)
    if spec.search is not None:
        for name, p in spec.search.params.items():
            for value in (p.low, p.high):
                try:
                    resolve_run(spec, {p.key: int(value) if p.type == "int" else value}, origin)
                except ConfigError as e:
                    errors.append(_config_error(str(e).splitlines()[0], f"{origin}: run {run_label({p.key: value})}")
                                  + f" (search.params.{name})")
    if errors:
        raise SweepError(errors)
    return Sweep(path=path, spec=spec, stage_order=order, runs=list(runs.values()))
