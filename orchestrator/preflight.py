"""Preflight: before the first sbatch, check that the paths the runs will read exist here.

``preflight(sweep) -> list[Problem]``: for every distinct value of a path key among the
sweep's runs (only keys a stage of the sweep reads), one problem when it is unset where it
is needed, missing, of the wrong kind or unreadable:

=========================  ======================================  =========================
key                        what must be there                      read by stages
=========================  ======================================  =========================
``data.root``              a folder with ``train/`` and ``val/``    tokenizer, finetune,
                           (``data.name: imagefolder``)            evaluate, generator
``data.root``              the four complete Fashion-MNIST idx      tokenizer, finetune,
                           files (``data.name: fashion_mnist``;     evaluate, generator
                           unset: Debian's folder)
``eval.inception_weights`` a readable file                         evaluate, generator
``eval.fid_reference``     a readable file                         generator
``loss.lpips_weights``     a readable file                         tokenizer, finetune, evaluate
``finetune.dino_weights``  a readable file                         finetune (and a tokenizer
                                                                   run with finetune.enabled)
``finetune.init_from``     a checkpoint file or run folder         tokenizer (finetune.enabled)
=========================  ======================================  =========================

Problems are errors, or warnings when the sweep says ``preflight: warn`` (clusters that mount
data and weights only on compute nodes).  Relative paths are checked against the current
directory, where jobs start.  Imports nothing heavy (no torch): it runs inside ``submit``
(the Fashion-MNIST file check imports ``core.data`` only when a sweep uses that dataset).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sweep import Sweep

CORE = ("tokenizer", "finetune", "evaluate", "generator")
# key -> (kind: "file" | "imagefolder" | "path", stages that read it)
PATH_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "data.root": ("imagefolder", CORE),
    "eval.inception_weights": ("file", ("evaluate", "generator")),
    "eval.fid_reference": ("file", ("generator",)),
    "loss.lpips_weights": ("file", ("tokenizer", "finetune", "evaluate")),
    "finetune.dino_weights": ("file", ("finetune", "tokenizer")),
    "finetune.init_from": ("path", ("tokenizer",)),
}


@dataclass(frozen=True)
class Problem:
    level: str  # "error" | "warning"
    key: str  # dotted config key
    message: str
    runs: tuple[str, ...] = ()  # labels of the runs concerned

    def __str__(self) -> str:
        who = f" ({len(self.runs)} run(s), e.g. {self.runs[0]})" if self.runs else ""
        return f"{self.level}: key '{self.key}': {self.message}{who}"


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _check_path(kind: str, value: str) -> str | None:
    """What is wrong with ``value`` as a ``kind`` path (None: fine)."""
    p = Path(value).expanduser()
    shown = f"{value}" + (f" (= {p.resolve()})" if not p.is_absolute() else "")
    if not p.exists():
        return f"{shown} does not exist on this machine"
    if kind == "file":
        if not p.is_file():
            return f"{shown} is not a file"
        if not os.access(p, os.R_OK):
            return f"{shown} is not readable"
    elif kind == "imagefolder":
        if not p.is_dir():
            return f"{shown} is not a folder"
        missing = [s for s in ("train", "val") if not (p / s).is_dir()]
        if missing:
            return f"{shown} has no {' or '.join(f'{m}/' for m in missing)} folder (ImageNet layout: train/ and val/)"
        unreadable = [s for s in ("train", "val") if not os.access(p / s, os.R_OK | os.X_OK)]
        if unreadable:
            return f"{shown}: {', '.join(f'{u}/' for u in unreadable)} not readable"
    elif not os.access(p, os.R_OK):
        return f"{shown} is not readable"
    return None


def preflight(sweep: Sweep) -> list[Problem]:
    """Problems with the paths the sweep's runs will read (see the module docstring).

    Returns
    -------
    One :class:`Problem` per (key, value) with something wrong, errors first; empty when all
    is there.  ``level`` is ``"warning"`` for every problem when ``sweep.spec.preflight == "warn"``.
    """
    level = "warning" if sweep.spec.preflight == "warn" else "error"
    stages = set(sweep.spec.stages)
    seen: dict[tuple[str, str | None], list[str]] = {}
    for run in sweep.runs:
        cfg = run.config
        for key, (kind, readers) in PATH_KEYS.items():
            if not stages & set(readers):
                continue
            if key.startswith("finetune.") and "finetune" not in stages and not cfg.finetune.enabled:
                continue  # the finetune section is read only by a fine-tuning run
            if key == "data.root" and cfg.data.name == "fashion_mnist":
                seen.setdefault(("data.root:fashion_mnist", (cfg.data.root, cfg.data.image_size)), []).append(run.label)
            if key == "data.root" and cfg.data.name != "imagefolder":
                continue
            value = _get(cfg, key)
            if value is None and key != "data.root":
                continue  # unset weights: the documented substitute backbone is used
            seen.setdefault((key, value), []).append(run.label)
    problems = []
    for (key, value), labels in seen.items():
        if key == "data.root:fashion_mnist":  # value = (data.root, data.image_size)
            from core.data.fashion_mnist import check_files  # torch: only for sweeps on this dataset
            if (msg := check_files(*value)):
                problems.append(Problem(level, "data.root", msg, tuple(labels)))
            continue
        kind = PATH_KEYS[key][0]
        msg = ("data.name is imagefolder but no data.root is set" if value is None else _check_path(kind, value))
        if msg:
            problems.append(Problem(level, key, msg, tuple(labels)))
    return sorted(problems, key=lambda p: (p.level != "error", p.key))


def report(problems: list[Problem], origin: str) -> str:
    """The problems as lines naming the sweep file (for the CLI)."""
    return "\n".join(f"{origin}: {p}" for p in problems)
