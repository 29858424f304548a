"""Result files: the only way a job reports to the results database.

Jobs never open the database.  Each stage attempt writes exactly one immutable file

    {run_root}/results/{stage}.attempt{N}.json

with :func:`write_result_file` (temp file + fsync + rename, via ``core.io.write_json_atomic``),
so a reader sees either nothing or the whole file.  One ingester
(``orchestrator.ingest.ingest``) later loads the files into the database.

Format (``schema_version`` 1), all keys required unless marked optional::

    {
      "schema_version": 1,
      "run_hash":   "0123456789abcdef",       # the run directory name (orchestrator.identity.run_key)
      "sweep":      "patch-size",             # sweep name
      "stage":      "tokenizer",              # tokenizer | evaluate | generator | any [a-z0-9_-]+
      "attempt":    1,                        # int >= 1; a later attempt supersedes earlier ones
      "status":     "finished",               # finished | failed | preempted
      "started_at": "2026-01-01T12:00:00+00:00",  # ISO 8601 (timezone optional, UTC assumed)
      "ended_at":   "2026-01-01T12:30:00+00:00",
      "host":       "node01",                 # or null
      "git_commit": "abc123",                 # or null
      "executor":   "slurm",                  # optional: slurm | local | debug
      "slurm_job_id":   "1234_5",             # or null
      "slurm_array_id": "1234",               # or null
      "config":  {...},                       # resolved RunConfig as a dict (config_dict)
      "params":  {"model.patch_size": 8},     # the sweep's axis values: str/int/float/bool/null
      "metrics": [{"name": "psnr", "value": 21.3, "step": 200,
                   "backbone": null, "num_samples": 512}],   # step/backbone/num_samples may be null
      "artifacts": [{"kind": "checkpoint", "path": "/abs/path"}],
      "error":   null,                        # or {"type": "RuntimeError", "message": "...",
                                              #     "log_tail": "last lines of the log"}
      "info":    {...}                        # optional, free-form (not loaded into tables)
    }

``make_payload`` builds this dict from the pieces a stage function has at hand.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from core.io import write_json_atomic

SCHEMA_VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # a result file is a few kB; anything near this is not one
MAX_DEPTH = 64  # nesting of objects/lists (a resolved config is 3 deep)
INT64 = (-(2**63), 2**63 - 1)
RESULT_STATUSES = ("finished", "failed", "preempted")
_STAGE_RE = re.compile(r"^[a-z0-9_\-]+$")
_NAME_RE = re.compile(r"^(?P<stage>[a-z0-9_\-]+)\.attempt(?P<attempt>[0-9]+)\.json$")


class ResultFileError(ValueError):
    """A result file that cannot be loaded; the message names the file and the key."""


def result_path(run_root: str | Path, stage: str, attempt: int) -> Path:
    return Path(run_root) / "results" / f"{stage}.attempt{int(attempt)}.json"


def make_payload(
    *,
    run_hash: str,
    sweep: str,
    stage: str,
    attempt: int,
    status: str,
    started_at: datetime | str,
    ended_at: datetime | str,
    config: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    metrics: list[Mapping[str, Any]] | None = None,
    artifacts: list[Mapping[str, Any]] | None = None,
    error: Mapping[str, Any] | None = None,
    host: str | None = None,
    git_commit: str | None = None,
    executor: str | None = None,
    slurm_job_id: str | None = None,
    slurm_array_id: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble a result payload (see the module docstring for the meaning of each key)."""
    iso = lambda t: t.isoformat() if isinstance(t, datetime) else t  # noqa: E731
    return {
        "schema_version": SCHEMA_VERSION,
        "run_hash": run_hash,
        "sweep": sweep,
        "stage": stage,
        "attempt": int(attempt),
        "status": status,
        "started_at": iso(started_at),
        "ended_at": iso(ended_at),
        "host": host,
        "git_commit": git_commit,
        "executor": executor,
        "slurm_job_id": None if slurm_job_id is None else str(slurm_job_id),
        "slurm_array_id": None if slurm_array_id is None else str(slurm_array_id),
        "config": dict(config),
        "params": dict(params or {}),
        "metrics": [
            {k: m.get(k) for k in ("name", "value", "step", "backbone", "num_samples")} for m in (metrics or [])
        ],
        "artifacts": [{"kind": a["kind"], "path": str(a["path"])} for a in (artifacts or [])],
        "error": dict(error) if error else None,
        "info": dict(info or {}),
    }


def write_result_file(run_root: str | Path, stage: str, attempt: int, payload: Mapping[str, Any]) -> Path:
    """Validate ``payload`` and write it atomically to ``{run_root}/results/{stage}.attempt{N}.json``.

    Parameters
    ----------
    run_root : the run's directory ``{runs_root}/{sweep}/{run_hash}``.
    stage, attempt : must match ``payload["stage"]`` / ``payload["attempt"]``.
    payload : dict in the module's format (``make_payload`` builds one).

    Returns
    -------
    Path of the written file.

    Raises
    ------
    ResultFileError
        when the payload is invalid or the file for this attempt already exists
        (result files are immutable: a new attempt gets a new number).
    """
    path = result_path(run_root, stage, attempt)
    payload = dict(payload)
    payload.setdefault("schema_version", SCHEMA_VERSION)
    validate_payload(payload, str(path))
    if payload["stage"] != stage or payload["attempt"] != int(attempt):
        raise ResultFileError(f"{path}: payload stage/attempt {payload['stage']}/{payload['attempt']} "
                              f"do not match {stage}/{attempt}")
    if path.exists():
        raise ResultFileError(f"{path}: result file exists; result files are immutable, use a new attempt")
    return write_json_atomic(path, payload)


def read_result_file(path: str | Path) -> dict:
    """Read and validate one result file.

    Raises
    ------
    ResultFileError
        naming the file and the key when the file is unreadable, truncated, not JSON,
        of an unknown schema version, or has a missing / wrongly typed key.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{path}: cannot read: {e}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{path}: not valid JSON (truncated?): {e}") from None
    validate_payload(payload, str(path))
    return payload


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_num(x: Any) -> bool:
    return type(x) is float or type(x) is int  # bool is excluded: type(True) is bool


def parse_time(value: str, origin: str, key: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ResultFileError(f"{origin}: key '{key}': not an ISO 8601 time: {value!r}") from None


def _fail(origin: str, key: str, msg: str):
    raise ResultFileError(f"{origin}: key '{key}': {msg}")


def validate_payload(p: Any, origin: str) -> None:
    """Check every key of a result payload; raise :class:`ResultFileError` naming the first bad key.

    Written as plain ``if`` tests (messages built only on failure): the ingester validates
    thousands of files per second.
    """
    if not isinstance(p, dict):
        raise ResultFileError(f"{origin}: top level must be a JSON object")
    if p.get("schema_version") != SCHEMA_VERSION:
        _fail(origin, "schema_version", "missing" if "schema_version" not in p else
              f"unsupported version {p['schema_version']!r} (this code reads {SCHEMA_VERSION})")
    for key in ("run_hash", "sweep", "stage", "status", "started_at", "ended_at"):
        v = p.get(key)
        if type(v) is not str or not v:
            _fail(origin, key, "missing or not a non-empty string")
    if not _STAGE_RE.match(p["stage"]):
        _fail(origin, "stage", f"invalid stage name {p['stage']!r}")
    if not _is_int(p.get("attempt")) or p["attempt"] < 1:
        _fail(origin, "attempt", "missing or not an int >= 1")
    if p["status"] not in RESULT_STATUSES:
        _fail(origin, "status", f"{p['status']!r} not in {RESULT_STATUSES}")
    parse_time(p["started_at"], origin, "started_at")
    parse_time(p["ended_at"], origin, "ended_at")
    for key in ("host", "git_commit", "executor", "slurm_job_id", "slurm_array_id"):
        v = p.get(key)
        if v is not None and type(v) is not str:
            _fail(origin, key, "must be a string or null")
    for key in ("config", "params"):
        if type(p.get(key)) is not dict:
            _fail(origin, key, "missing or not an object")
    for k, v in p["params"].items():
        if v is not None and not isinstance(v, (str, int, float, bool)):
            _fail(origin, f"params.{k}", "must be a string, number, bool or null")
    if type(p.get("metrics")) is not list:
        _fail(origin, "metrics", "missing or not a list")
    for i, m in enumerate(p["metrics"]):
        if type(m) is not dict:
            _fail(origin, f"metrics[{i}]", "not an object")
        name, v, step, n, bb = m.get("name"), m.get("value"), m.get("step"), m.get("num_samples"), m.get("backbone")
        if type(name) is not str or not name:
            _fail(origin, f"metrics[{i}].name", "missing or empty")
        # NaN is legal in a metric (a diverged run): Python's json reads and writes it.
        if v is not None and not _is_num(v):
            _fail(origin, f"metrics[{i}].value", "must be a number or null")
        if step is not None and not _is_int(step):
            _fail(origin, f"metrics[{i}].step", "must be an int or null")
        if n is not None and not _is_int(n):
            _fail(origin, f"metrics[{i}].num_samples", "must be an int or null")
        if bb is not None and type(bb) is not str:
            _fail(origin, f"metrics[{i}].backbone", "must be a string or null")
    if type(p.get("artifacts")) is not list:
        _fail(origin, "artifacts", "missing or not a list")
    for i, a in enumerate(p["artifacts"]):
        if type(a) is not dict or type(a.get("kind")) is not str or type(a.get("path")) is not str:
            _fail(origin, f"artifacts[{i}]", "must be {kind: str, path: str}")
    if p.get("error") is not None and type(p["error"]) is not dict:
        _fail(origin, "error", "must be an object or null")
    if "info" in p and type(p["info"]) is not dict:
        _fail(origin, "info", "must be an object")
    check_values(p, origin)


def check_values(p: dict, origin: str) -> None:
    """Values every database can store: integers within 64 bits, text without NUL characters
    or lone surrogates, no NaN/Infinity outside ``metrics[].value`` (a diverged run), nesting at
    most ``MAX_DEPTH``.  Raises :class:`ResultFileError` naming the key.

    One iterative walk (no recursion: a hostile file cannot exhaust the stack)."""
    stack: list[tuple[str, Any, int]] = [(k, v, 1) for k, v in p.items() if k != "metrics"]
    stack += [(f"metrics[{i}].{k}", v, 2) for i, m in enumerate(p["metrics"]) for k, v in m.items()]
    while stack:
        key, v, depth = stack.pop()
        t = type(v)
        if t is str:
            if "\x00" in v:
                _fail(origin, key, "contains a NUL character")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                _fail(origin, key, "contains a lone surrogate (not valid UTF-8 text)")
        elif t is int:
            if not INT64[0] <= v <= INT64[1]:
                _fail(origin, key, f"integer {str(v)[:30]}... does not fit in 64 bits")
        elif t is float:
            if v != v or v in (float("inf"), float("-inf")):
                if not (key.startswith("metrics[") and key.endswith("].value")):
                    _fail(origin, key, f"{v} is allowed only in a metric value")
        elif t is dict or t is list:
            if depth >= MAX_DEPTH:
                _fail(origin, key, f"nested deeper than {MAX_DEPTH} levels")
            items = v.items() if t is dict else enumerate(v)
            for k, x in items:
                if t is dict:
                    if type(k) is not str or "\x00" in k:
                        _fail(origin, key, "has a key with a NUL character")
                stack.append((f"{key}.{k}" if t is dict else f"{key}[{k}]", x, depth + 1))


def iter_result_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories into absolute result-file paths, sorted and unique.

    A directory is searched recursively for files named ``{stage}.attempt{N}.json``;
    an explicit file path is returned as given (the ingester validates it).  Paths are made
    absolute once per argument (not per file: resolving 10k paths costs seconds).
    """
    out: set[Path] = set()
    for p in paths:
        p = Path(p).resolve()
        if p.is_dir():
            for dirpath, _, files in os.walk(p):
                out.update(Path(dirpath, f) for f in files if _NAME_RE.match(f))
        else:
            out.add(p)
    return sorted(out, key=str)  # str keys: comparing Path objects is slow at 10k files
