"""Config storage for fast tables: each sweep keeps a flattened *base* config and each run
the flattened keys where its config differs (the sweep's axis values, mostly).

``runs.config`` stays the full resolved config (the record); ``runs.config_delta`` and
``sweeps.base_config`` exist so that the one-row-per-run table over 10k runs does not
decode and flatten 10k full configs.  A run without a delta (NULL) is read from its config.
"""
from __future__ import annotations

from typing import Any, Mapping

UNSET = "__unset__"  # delta key listing base keys the run's config does not have


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"patch_size": 8}}`` -> ``{"model.patch_size": 8}`` (lists kept as lists)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):  # not typing.Mapping: its isinstance is ~20x slower
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_delta(flat: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of ``flat`` that differ from ``base`` (and, under ``UNSET``, base keys it lacks)."""
    delta = {k: v for k, v in flat.items() if k not in base or base[k] != v or type(base[k]) is not type(v)}
    missing = [k for k in base if k not in flat]
    if missing:
        delta[UNSET] = missing
    return delta


def apply_delta(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`config_delta`: the run's flat config."""
    out = {k: v for k, v in base.items() if k not in delta.get(UNSET, ())}
    out.update((k, v) for k, v in delta.items() if k != UNSET)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten` (keys split on dots)."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def tree_delta(config: Mapping[str, Any], base_tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """:func:`config_delta` of ``flatten(config)`` against ``flatten(base_tree)``, computed on the
    trees: a section equal to the base's is skipped with one C-level dict comparison (the
    common case at ingest).  Inside such a section Python equality decides (``1 == 1.0``),
    which cannot differ for a typed RunConfig."""
    delta: dict[str, Any] = {}
    unset: list[str] = []
    for k, v in config.items():
        b = base_tree.get(k, UNSET)
        if isinstance(v, dict):
            if v == b:
                continue
            sub = tree_delta(v, b if isinstance(b, dict) else {}, f"{prefix}{k}.")
            unset += sub.pop(UNSET, [])
            delta.update(sub)
            if b is not UNSET and not isinstance(b, dict):
                unset.append(f"{prefix}{k}")  # a leaf in the base, a section here
        else:
            if isinstance(b, dict):  # a section in the base, a leaf here
                unset += [f"{prefix}{k}.{kk}" for kk in flatten(b)]
            if b is UNSET or isinstance(b, dict) or b != v or type(b) is not type(v):
                delta[f"{prefix}{k}"] = v
    for k, b in base_tree.items():
        if k not in config:
            unset += [f"{prefix}{k}.{kk}" for kk in flatten(b)] if isinstance(b, dict) else [f"{prefix}{k}"]
    if unset:
        delta[UNSET] = unset
    return delta
