"""What the three stage entry points (``core.train``, ``core.evaluate``, ``core.generate``) share.

A stage directory holds ``config.yaml`` (the config it was started with) and, when finished,
``result.json``.  Every entry point asks the same questions of it, answered here once:

* :func:`done` — is the stage already finished? (its ``result.json`` is complete);
* :func:`claim` — does the directory hold a run of another config? (refused, else the config
  is saved there);
* :func:`check_tokenizer` — was the tokenizer a stage consumes trained for this config?
* :func:`metric_row` — one row of a result's ``metrics`` list.

Every refusal is one :class:`StageMismatch`, one message form: the directory, what it holds,
and each differing key with its value there and here.

Length keys (:data:`LENGTH_KEYS`): the keys that only make a stage longer.  Two configs that
differ only there describe the same stage, stopped at different points, so a finished stage
is *continued* rather than redone: the generator's learning rate is constant and its EMA
warm-up depends on the step only (``core.generator.train``), so training it from step N to
2N from its step-N checkpoint takes exactly the steps a 2N run takes.  The tokenizer's
``train.steps`` is not a length key: its cosine schedule depends on the total.  The
orchestrator leaves the same keys out of the generator's identity (``orchestrator/identity.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from core.config import ConfigError, RunConfig, config_dict, load_config, save_config
from core.io import read_complete_result

# stage -> dotted keys that change only how long the stage runs (see the module docstring)
LENGTH_KEYS: dict[str, tuple[str, ...]] = {"generator": ("generator.steps", "generator.eval_at")}

# What a consumer of a tokenizer (evaluation, generator) must share with the tokenizer's run:
# the architecture and the images (data.num_workers is how they are loaded, not which).
TOKENIZER_SECTIONS = ("model", "data")
TOKENIZER_IGNORED = ("data.num_workers",)


class StageMismatch(ConfigError):
    """A stage directory (or the tokenizer a stage reads) holds a run of a different config.

    ``directory`` and ``keys`` (dotted key -> (value there, value here)) are kept for callers.
    """

    def __init__(self, directory: str | Path, holds: str, keys: Mapping[str, tuple[Any, Any]], hint: str = ""):
        self.directory, self.keys = Path(directory), dict(keys)
        diff = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in ((k, *v) for k, v in self.keys.items()))
        super().__init__(f"{directory}: holds {holds} of a different config ({diff})" + (f"; {hint}" if hint else ""))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differing_keys(there: RunConfig, here: RunConfig, sections: Iterable[str] | None = None,
                   ignore: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, ``{key: (there, here)}``, sorted; limited to ``sections``."""
    a, b = flatten(config_dict(there)), flatten(config_dict(here))
    skip = set(ignore)
    keep = lambda k: k not in skip and (sections is None or k.split(".")[0] in sections)  # noqa: E731
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if keep(k) and a.get(k) != b.get(k)}


def done(out_dir: Path, stage: str, metrics: Iterable[str]) -> dict | None:
    """The stage's complete ``result.json`` (see :func:`core.io.read_complete_result`), else None."""
    return read_complete_result(Path(out_dir) / "result.json", stage, metrics)


def saved_config(out_dir: Path) -> RunConfig | None:
    """The config a stage directory was started with (None: a new directory)."""
    path = Path(out_dir) / "config.yaml"
    return load_config(path) if path.exists() else None


def claim(cfg: RunConfig, out_dir: Path, stage: str, holds: str, write: bool = True) -> RunConfig | None:
    """Refuse ``out_dir`` when it holds a run of another config; save ``cfg`` there.

    Keys in ``LENGTH_KEYS[stage]`` may differ (a longer run of the same stage); the saved
    config is then replaced by ``cfg``.  Call it on every rank (every rank raises alike, before
    anyone writes) with ``write`` true on the writing rank only.

    Returns the config the directory held before (None when new).

    Raises
    ------
    StageMismatch naming the directory and the differing keys.
    """
    out_dir = Path(out_dir)
    old = saved_config(out_dir)
    if old is not None:
        keys = differing_keys(old, cfg, ignore=LENGTH_KEYS.get(stage, ()))
        if keys:
            raise StageMismatch(out_dir, holds, keys, "use a new directory")
    if write and (old is None or old != cfg):
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    return old


def check_tokenizer(tok_cfg: RunConfig, cfg: RunConfig, tokenizer_dir: str | Path) -> None:
    """Refuse a tokenizer trained for another architecture or other images than ``cfg`` asks for."""
    keys = differing_keys(tok_cfg, cfg, TOKENIZER_SECTIONS, TOKENIZER_IGNORED)
    if keys:
        raise StageMismatch(tokenizer_dir, "a tokenizer", keys, "point the stage at the tokenizer of this config")


def metric_row(name: str, value: float, step: int | None, backbone: str | None = None,
               num_samples: int | None = None) -> dict[str, Any]:
    """One entry of a result's ``metrics``: the schema every stage writes (docs/ARCHITECTURE.md)."""
    return {"name": name, "value": value, "step": step, "backbone": backbone, "num_samples": num_samples}
