"""Stage identities: every config key a stage reads is declared (the core entry points run on a
tiny config with attribute reads recorded), and a key added with its default moves nothing."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import create_model

import core.config as C
from orchestrator import identity
from orchestrator.db.configs import flatten
from orchestrator.decide import plan_steps
from orchestrator.plan import build_plan
from orchestrator.stages import run_stage
from orchestrator.submit import write_run_dirs
from orchestrator.sweep import load_sweep

TINY = {
    "data": {"image_size": 32, "train_size": 64, "val_size": 64, "batch_size": 8},
    "model": {"latent_channels": 8, "patch_size": 8},
    "loss": {"perceptual": 0.0},
    "train": {"steps": 2, "ckpt_every": 2, "device": "cpu"},
    "finetune": {"steps": 2, "disc_start_step": 1, "adv_start_step": 1, "disc_image_size": 32},
    "eval": {"num_samples": 16, "probe_train": 64, "probe_val": 64, "batch_size": 16},
    "generator": {"steps": 2, "batch_size": 8, "num_samples": 16, "sample_steps": 2, "eval_at": [1]},
}
STAGES = {"tokenizer": {"needs": []}, "finetune": {"needs": ["tokenizer"]}, "evaluate": {"needs": ["finetune"]},
          "generator": {"needs": ["finetune"]}}


def sweep_file(tmp_path: Path, base: dict, stages: dict = STAGES, name: str = "ident") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "stages": stages, "executor": "debug",
                                    "runs_dir": str(tmp_path / "runs"),
                                    "axes": {"model.decoder_size": ["micro", "mini"]}}))
    return path


class Recorder:
    """Records ``section.key`` for every attribute read of a field of the run's config: the
    RunConfig a stage builds from its ``config.yaml`` and the copies derived from it (the phase
    configs).  Sections core builds for itself (an ``OptimConfig`` of fixed values) and the
    configs of upstream stages it loads from their directories are not the run's reads."""

    def __init__(self):
        self.sections = {f.annotation: name for name, f in C.RunConfig.model_fields.items()}
        self.reads: set[str] = set()
        self.on = False
        self.tracked: dict[int, object] = {}  # id -> object (kept alive: ids are not reused)

    def track(self, obj):
        self.tracked[id(obj)] = obj
        if isinstance(obj, C.RunConfig):
            for name in C.RunConfig.model_fields:
                sec = object.__getattribute__(obj, name)
                self.tracked[id(sec)] = sec
        return obj

    def install(self, monkeypatch):
        import orchestrator.stages as stages

        load, copy = stages.load_config, C.Section.model_copy

        def getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            if self.on and id(obj) in self.tracked:
                section = self.sections.get(type(obj))
                if section is not None and name in type(obj).model_fields:
                    self.reads.add(f"{section}.{name}")
            return value

        def model_copy(obj, *args, **kwargs):
            out = copy(obj, *args, **kwargs)
            return self.track(out) if id(obj) in self.tracked else out

        monkeypatch.setattr(C.Section, "__getattribute__", getattribute)
        monkeypatch.setattr(C.Section, "model_copy", model_copy)
        monkeypatch.setattr(stages, "load_config", lambda *a, **k: self.track(load(*a, **k)))


def undeclared(stage: str, reads: set[str]) -> list[str]:
    return sorted(k for k in reads if not identity.declared(stage, k))


@pytest.mark.slow
def test_every_config_key_a_stage_reads_is_declared(tmp_path, monkeypatch):
    sweep = load_sweep(sweep_file(tmp_path, TINY))
    runs, steps, configs, _ = plan_steps(None, sweep, sweep.runs[:1])
    plan = build_plan(sweep, {runs[0].run_hash: list(STAGES)}, runs, 10, steps)
    write_run_dirs(sweep, plan, "debug", configs)
    root = sweep.runs_root / runs[0].run_hash
    spy = Recorder()
    spy.install(monkeypatch)
    reads: dict[str, set[str]] = {}
    for stage in sweep.stage_order:
        spy.reads, spy.on = set(), True
        run_stage(stage, root)
        spy.on = False
        reads[stage] = spy.reads
        assert (root / "results" / f"{stage}.attempt1.json").exists()
    monkeypatch.undo()
    assert {"train.steps", "model.patch_size"} <= reads["tokenizer"] and "finetune.lr" in reads["finetune"]
    assert "eval.num_samples" in reads["evaluate"] and "generator.lr" in reads["generator"]  # the recorder sees
    missing = {stage: undeclared(stage, keys) for stage, keys in reads.items() if undeclared(stage, keys)}
    assert missing == {}, "stages read keys orchestrator.identity.STAGES does not declare"
    # the check bites: drop one declared section and the same reads are reported
    d = identity.STAGES["evaluate"]
    monkeypatch.setitem(identity.STAGES, "evaluate", dataclasses.replace(
        d, reads=tuple(r for r in d.reads if r != "eval.*"), files=()))
    assert any(k.startswith("eval.") for k in undeclared("evaluate", reads["evaluate"]))


def test_declarations_name_real_keys():
    keys = set(flatten(C.config_dict(C.RunConfig())))
    for stage, d in identity.STAGES.items():
        for pattern in d.reads + d.files + d.operational + d.fixed + d.length:
            assert any(identity._match(k, (pattern,)) for k in keys), f"{stage}: {pattern} matches no config key"


def _identities(tmp_path: Path) -> dict:
    sweep = load_sweep(sweep_file(tmp_path, TINY))
    runs, steps, _, _ = plan_steps(None, sweep, sweep.runs)
    return {r.run_hash: {st: s.identity for st, s in steps[r.run_hash].items()} for r in runs}


def test_a_key_added_with_its_default_moves_no_identity(tmp_path, monkeypatch):
    before = _identities(tmp_path)
    old_hashes = {C.config_hash(r.config) for r in load_sweep(sweep_file(tmp_path, TINY)).runs}
    # a later release adds eval.new_subset_rule (default: the old behaviour) and data.hflip2
    Eval = create_model("EvalConfig", __base__=C.EvalConfig, new_subset_rule=(bool, False))
    Data = create_model("DataConfig", __base__=C.DataConfig, hflip2=(bool, False))
    Run = create_model("RunConfig", __base__=C.RunConfig, eval=(Eval, Eval()), data=(Data, Data()))
    for module in ("core.config", "orchestrator.sweep", "orchestrator.identity"):
        monkeypatch.setattr(f"{module}.RunConfig", Run)
    C._default_dict.cache_clear()
    try:
        sweep = load_sweep(sweep_file(tmp_path, TINY))
        assert "new_subset_rule" in sweep.runs[0].config_dict()["eval"]
        assert {C.config_hash(r.config) for r in sweep.runs}.isdisjoint(old_hashes)  # the whole-config hash moved
        assert _identities(tmp_path) == before  # no run or stage identity did
        # the new key set to a non-default value is a changed evaluation, nothing upstream
        changed = load_sweep(sweep_file(tmp_path, {**TINY, "eval": {**TINY["eval"], "new_subset_rule": True}}))
        runs, steps, _, _ = plan_steps(None, changed, changed.runs)
        after = {r.run_hash: {st: s.identity for st, s in steps[r.run_hash].items()} for r in runs}
        assert set(after).isdisjoint(before)
        for old, new in zip(before.values(), after.values()):
            assert old["tokenizer"] == new["tokenizer"] and old["finetune"] == new["finetune"]
            assert old["evaluate"] != new["evaluate"] and old["generator"] == new["generator"]
    finally:
        monkeypatch.undo()
        C._default_dict.cache_clear()


def test_what_each_change_moves(tmp_path):
    """eval.* moves evaluate only; generator.* the generator only; model.* everything;
    generator length (steps, eval_at) and operational keys move nothing."""
    def ids(**overrides):
        base = {k: dict(v) for k, v in TINY.items()}
        for key, value in overrides.items():
            section, leaf = key.split("__")
            base[section][leaf] = value
        sweep = load_sweep(sweep_file(tmp_path, base))
        runs, steps, _, _ = plan_steps(None, sweep, sweep.runs[:1])
        return {st: s.identity for st, s in steps[runs[0].run_hash].items()}

    ref = ids()
    moved = lambda new: sorted(st for st in ref if ref[st] != new[st])  # noqa: E731
    assert moved(ids(eval__num_samples=32)) == ["evaluate"]
    assert moved(ids(generator__lr=1e-3)) == ["generator"]
    assert moved(ids(model__latent_channels=4)) == sorted(ref)
    assert moved(ids(generator__steps=8, generator__eval_at=[1, 4])) == []
    assert moved(ids(data__num_workers=1, train__log_every=1)) == []
    assert moved(ids(train__steps=4)) == sorted(ref)  # the tokenizer's cosine spans train.steps
    assert moved(ids(finetune__lr=1e-4)) == ["evaluate", "finetune", "generator"]


@pytest.mark.parametrize("stage", ["tokenizer", "evaluate", "generator"])
def test_stage_identity_includes_its_protocol_version(stage, monkeypatch, tmp_path):
    before = _identities(tmp_path)
    monkeypatch.setitem(identity.VERSIONS, stage, identity.VERSIONS[stage] + 1)
    after = _identities(tmp_path)
    downstream = {"tokenizer": set(STAGES), "evaluate": {"evaluate"}, "generator": {"generator"}}[stage]
    for h in before:
        assert {st for st in before[h] if before[h][st] != after[h][st]} == downstream
