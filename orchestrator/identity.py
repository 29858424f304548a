"""What each stage depends on, declared once, and the identities built from it (torch-free).

A stage's identity is a hash over exactly what it depends on::

    {"stage", "version": VERSIONS[stage],          # bumped when the stage's semantics change
     "keys": {dotted key: value},                   # the config keys it reads (non-default only)
     "files": {dotted key: content hash},           # weights / reference / manifest files it reads
     "upstream": {stage: identity},                 # the stages whose outputs it consumes
     "params": {...}}                               # its options in the sweep file

``STAGES`` declares per stage the config keys it reads (``"data.*"`` = a whole section),
which of them name files (hashed by content, so moving a file changes nothing), which are
*operational* (read, but they do not change the result: workers, logging, checkpoint
cadence, compilation) and which are its *length* (the generator: a longer generator
continues from its last checkpoint, so its identity leaves the length out and the planner
extends it).  ``tests/orchestrator/test_identity.py`` runs every core entry point on a tiny
config with attribute reads recorded and fails on a read that is declared nowhere here.

Canonical form: a key whose value equals its schema default (``core.config.non_default``) is
left out, so a key added later with a default that keeps the old behaviour moves no identity.
A run's identity (:func:`run_key`, its directory name) is the same hash over the whole
non-default config.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.config import RunConfig, config_dict, non_default
from core.stage import LENGTH_KEYS
from orchestrator.db.configs import flatten

# Bump a stage's version when its semantics change (a new evaluation subset rule, a fixed bug
# that changes numbers): that stage and its dependants re-run, nothing upstream does.
VERSIONS = {"tokenizer": 1, "finetune": 1, "evaluate": 1, "generator": 1, "echo": 1, "selftest": 1}

_OPERATIONAL = ["data.num_workers", "train.device", "train.ckpt_every", "train.keep_last", "train.log_every",
                "train.compile"]


@dataclass(frozen=True)
class StageDeps:
    reads: tuple[str, ...]  # keys / "section.*" patterns whose values are the stage's inputs
    files: tuple[str, ...] = ()  # keys naming files read (content-hashed, path left out)
    operational: tuple[str, ...] = tuple(_OPERATIONAL)  # read, result unchanged
    fixed: tuple[str, ...] = ()  # read, but set by the stage itself (the phase functions)
    length: tuple[str, ...] = ()  # the stage's length: out of the identity, the planner extends


_TOKENIZER_READS = ("data.*", "model.*", "loss.*", "ssl.*", "optim.*", "train.steps", "train.seed",
                    "train.precision")
STAGES: dict[str, StageDeps] = {
    # core.train.train on core.config.joint_phase(cfg): the cosine schedule spans train.steps,
    # so a longer tokenizer is a new one.
    "tokenizer": StageDeps(reads=_TOKENIZER_READS, files=("loss.lpips_weights",),
                           fixed=("finetune.*",)),
    # core.train.train on core.config.finetune_phase(cfg, tokenizer dir)
    "finetune": StageDeps(reads=_TOKENIZER_READS + ("finetune.*",),
                          files=("loss.lpips_weights", "finetune.dino_weights"), fixed=("finetune.init_from",)),
    # core.evaluate.evaluate(cfg, tokenizer dir)
    # (ssl.method: read by RunConfig's validator, which derives model.class_token from it)
    "evaluate": StageDeps(reads=("data.*", "model.*", "eval.*", "train.seed", "train.precision", "ssl.method"),
                          files=("eval.inception_weights", "eval.fid_reference", "loss.lpips_weights")),
    # core.generate.generate(cfg, tokenizer dir): constant learning rate (no schedule over
    # generator.steps), so a longer generator continues the shorter one.
    "generator": StageDeps(reads=("data.*", "model.*", "generator.*", "eval.fid_backbone", "eval.batch_size",
                                  "eval.subset_seed", "eval.inception_weights", "eval.fid_reference",
                                  "train.seed", "train.precision", "ssl.method"),
                           files=("eval.inception_weights", "eval.fid_reference"),
                           length=LENGTH_KEYS["generator"]),  # core's one declaration
    # built-in stand-ins (no core code); they read keys named by their params: the whole config
    "echo": StageDeps(reads=("*",), operational=()),
    "selftest": StageDeps(reads=("*",), operational=()),
}


def _match(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


_ROLE: dict[tuple[str, str], bool] = {}  # (stage, key) -> key is an identity key of stage (a 1,000-run grid asks 10^4 times)


def _identity_key(stage: str, key: str) -> bool:
    hit = _ROLE.get((stage, key))
    if hit is None:
        d = STAGES[stage]
        hit = _ROLE[(stage, key)] = _match(key, d.reads) and not _match(
            key, d.files + d.operational + d.fixed + d.length)
    return hit


def _dotted(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def declared(stage: str, key: str) -> bool:
    """Whether ``stage`` declares reading ``key`` (in any role)."""
    d = STAGES[stage]
    return _match(key, d.reads + d.files + d.operational + d.fixed + d.length)


# ----------------------------------------------------------------------------- file hashes

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _cache_path() -> Path:
    root = os.environ.get("ORCHESTRATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrate")
    return Path(root) / "file_hashes.json"


def file_hash(path: str) -> str:
    """sha256 (16 hex) of a file's content, cached by (path, size, mtime) in memory and in
    ``$ORCHESTRATE_CACHE/file_hashes.json`` so that re-submitting a sweep reads no weights.
    A path that is not a file here hashes as ``missing:<path>`` (preflight reports it)."""
    try:
        st = os.stat(path)
    except OSError:
        return f"missing:{path}"
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    cache = _cache_path()
    try:
        disk = json.loads(cache.read_text())
    except (OSError, ValueError):
        disk = {}
    text_key = f"{key[0]}|{key[1]}|{key[2]}"
    if text_key not in disk:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        disk[text_key] = h.hexdigest()[:16]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: hash again next time
    _FILE_HASHES[key] = disk[text_key]
    return disk[text_key]


# ----------------------------------------------------------------------------- identities


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageKey:
    """One stage of one run: its identity, the inputs it was computed from and its length."""

    identity: str
    inputs: dict
    length: dict = field(default_factory=dict)


def canonical(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Flat non-default keys of a resolved config (a RunConfig or its ``config_dict``)."""
    tree = config_dict(config) if isinstance(config, RunConfig) else config
    return flatten(non_default(tree))


def run_key(config: RunConfig | Mapping[str, Any]) -> str:
    """A run's identity: hash of its non-default config (16 hex, its directory name)."""
    return digest(canonical(config))


def digest_canonical(config: RunConfig | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(:func:`run_key`, :func:`canonical`) in one pass."""
    flat = canonical(config)
    return digest(flat), flat


def stage_keys(flat: Mapping[str, Any], tree: Mapping[str, Any], order: list[str],
               needs: Mapping[str, list[str]], params: Mapping[str, Mapping]) -> dict[str, StageKey]:
    """Identities of every stage of one run, upstream first.

    Parameters
    ----------
    flat : the run's canonical flat config (:func:`canonical`).
    tree : the run's whole config (nested or flat dict: file keys and lengths are read from it).
    order, needs : the sweep's stages in dependency order and what each consumes.
    params : each stage's options from the sweep file.
    """
    out: dict[str, StageKey] = {}
    get = tree.get if any("." in k for k in tree) else lambda k: _dotted(tree, k)
    for stage in order:
        d = STAGES[stage]
        keys = {k: v for k, v in flat.items() if _identity_key(stage, k)}
        files = {k: file_hash(str(get(k))) for k in d.files if get(k) not in (None, "")}
        inputs = {"stage": stage, "version": VERSIONS[stage], "keys": keys, "files": files,
                  "upstream": {n: out[n].identity for n in needs[stage]}, "params": dict(params.get(stage) or {})}
        length = {k: get(k) for k in d.length if get(k) is not None}
        out[stage] = StageKey(digest(inputs), inputs, length)
    return out


def why_different(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """Why a stage with inputs ``new`` is not the one computed from ``old`` (one line)."""
    if not old:
        return "new"
    parts = []
    if old.get("version") != new.get("version"):
        parts.append(f"protocol version {old.get('version')} -> {new.get('version')}")
    ok, nk = old.get("keys", {}), new.get("keys", {})
    changed = sorted(k for k in ok.keys() | nk.keys() if ok.get(k, "<default>") != nk.get(k, "<default>"))
    if changed:
        shown = ", ".join(f"{k} {ok.get(k, '<default>')!r} -> {nk.get(k, '<default>')!r}" for k in changed[:4])
        parts.append("changed " + shown + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""))
        if new.get("stage") in ("tokenizer", "finetune") and "train.steps" in changed:
            parts.append("a longer tokenizer is a new one: its cosine schedule spans train.steps")
    of, nf = old.get("files", {}), new.get("files", {})
    for k in sorted(of.keys() | nf.keys()):
        if of.get(k) != nf.get(k):
            parts.append(f"file {k}: content {of.get(k, 'none')} -> {nf.get(k, 'none')}")
    ou, nu = old.get("upstream", {}), new.get("upstream", {})
    moved = sorted(s for s in ou.keys() | nu.keys() if ou.get(s) != nu.get(s))
    if moved:
        parts.append("upstream " + ", ".join(moved) + " changed")
    if old.get("params") != new.get("params"):
        parts.append("stage params changed")
    return "; ".join(parts) or "inputs changed"
