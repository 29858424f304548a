"""The stage toolkit (core.stage) as the entry points use it, and extending a finished generator."""
import json

import pytest
import torch

GEN = {"train.steps": 2, "generator.steps": 6, "generator.batch_size": 8, "generator.num_samples": 16,
       "generator.sample_steps": 2, "eval.batch_size": 16, "train.ckpt_every": 100, "train.log_every": 1}


def test_one_error_names_the_directory_and_every_differing_key(tiny_config, tmp_path):
    from core.evaluate import evaluate
    from core.stage import StageMismatch
    from core.train import train

    train(tiny_config(**{"train.steps": 2}), tmp_path / "tok", stop_at_step=1)
    with pytest.raises(StageMismatch) as err:
        train(tiny_config(**{"train.steps": 2, "optim.lr": 0.5, "model.latent_channels": 4}), tmp_path / "tok")
    assert str(err.value).startswith(f"{tmp_path / 'tok'}: holds a tokenizer run of a different config "
                                     "(model.latent_channels: 8 there, 4 here; optim.lr: 0.001 there, 0.5 here)")
    assert err.value.keys == {"model.latent_channels": (8, 4), "optim.lr": (0.001, 0.5)}
    # the tokenizer a stage consumes: the same error type and form (only model/data keys count)
    train(tiny_config(**{"train.steps": 2}), tmp_path / "tok")
    other = tiny_config(**{"train.steps": 2, "model.latent_channels": 4, "data.num_workers": 1, "optim.lr": 0.5})
    with pytest.raises(StageMismatch, match=r"tok: holds a tokenizer of a different config "
                                            r"\(model.latent_channels: 8 there, 4 here\)"):
        evaluate(other, tmp_path / "tok", tmp_path / "eval")


def test_length_keys_leave_the_identity_alone(tiny_config, tmp_path):
    from core.config import load_config
    from core.stage import LENGTH_KEYS, StageMismatch, claim

    short, long = tiny_config(**GEN), tiny_config(**{**GEN, "generator.steps": 12, "generator.eval_at": [9]})
    assert LENGTH_KEYS == {"generator": ("generator.steps", "generator.eval_at")}
    assert claim(short, tmp_path / "gen", "generator", "a generator run") is None  # a new directory
    assert claim(long, tmp_path / "gen", "generator", "a generator run") == short  # the same stage, longer
    assert load_config(tmp_path / "gen" / "config.yaml") == long
    with pytest.raises(StageMismatch, match=r"train.steps: 2 there, 3 here"):
        claim(tiny_config(**{**GEN, "train.steps": 3}), tmp_path / "gen", "generator", "a generator run")
    claim(short, tmp_path / "tok", "tokenizer", "a tokenizer run")
    with pytest.raises(StageMismatch, match=r"generator.steps: 6 there, 12 here"):  # not a length key there
        claim(long, tmp_path / "tok", "tokenizer", "a tokenizer run")


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_a_finished_generator_asked_for_more_continues_it(tiny_config, tmp_path):
    """steps 6 -> 12 with an eval point at 9: resumed from the step-6 checkpoint (no step re-run),
    only 9 and 12 evaluated, the result holds 6, 9 and 12, the weights are the straight 12-step run's."""
    from core.generate import generate
    from core.train import train
    from core.trainer.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    cfg = tiny_config(**GEN)
    train(cfg, tmp_path / "tok")
    out = tmp_path / "gen"
    first = generate(cfg, tmp_path / "tok", out)
    assert [(m["name"], m["step"]) for m in first["metrics"]] == [("gfid", 6), ("inception_score", 6),
                                                                  ("generator_train_time_s", 6)]
    logged = len(_log(out))

    longer = tiny_config(**{**GEN, "generator.steps": 12, "generator.eval_at": [9]})
    result = generate(longer, tmp_path / "tok", out)
    new_lines = _log(out)[logged:]
    assert [r["step"] for r in new_lines if "loss" in r] == list(range(7, 13))  # nothing before 7 re-run
    assert [(r["eval"]["name"], r["step"]) for r in new_lines if "eval" in r] == [
        ("gfid", 9), ("inception_score", 9), ("gfid", 12), ("inception_score", 12)]
    rows = {(m["name"], m["step"]): m["value"] for m in result["metrics"]}
    assert set(rows) == {("gfid", 6), ("inception_score", 6), ("gfid", 9), ("inception_score", 9),
                         ("gfid", 12), ("inception_score", 12), ("generator_train_time_s", 12)}
    assert rows[("gfid", 6)] == first["metrics"][0]["value"]  # the old point is kept, not re-measured
    assert result["info"]["continued_from"] == [6] and result["info"]["steps"] == 12
    assert list(result["info"]["inception_score_rules"].values()) == [[6, 9, 12]]
    assert json.loads((out / "result.json").read_text()) == result
    assert generate(longer, tmp_path / "tok", out) == result  # now complete: returned as is

    # The generator's learning rate and EMA warm-up do not depend on the total: continuing 6 -> 12
    # takes exactly the steps of a straight 12-step run.
    generate(longer, tmp_path / "tok", tmp_path / "straight")
    a = load_checkpoint(out / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    for key in ("model", "ema"):
        for name, w in a[key].items():
            assert torch.equal(w, b[key][name]), (key, name)

    # What no continuation can give is refused, naming the key: fewer steps, a point in the past.
    from core.stage import StageMismatch

    with pytest.raises(StageMismatch, match=r"generator.steps: 12 there, 8 here.*not shortened"):
        generate(tiny_config(**{**GEN, "generator.steps": 8}), tmp_path / "tok", out)
    with pytest.raises(StageMismatch, match=r"generator.eval_at.*steps \[3\] lie before step 12"):
        generate(tiny_config(**{**GEN, "generator.steps": 12, "generator.eval_at": [3, 9]}), tmp_path / "tok", out)
    # ... and so is any other change, as for every stage
    with pytest.raises(StageMismatch, match=r"generator.lr: 0.0002 there, 0.001 here"):
        generate(tiny_config(**{**GEN, "generator.steps": 14, "generator.lr": 1e-3}), tmp_path / "tok", out)


# The release before stage continuation (and before the IS split rule was recorded).
PREVIOUS_RELEASE = "279d85a1cb856843da84396a9abb985f2001cbdb"
_STRIP_EDITABLE = ("import sys\n"  # the venv's editable install would map `core.*` back to this tree
                   "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]\n")


@pytest.mark.slow  # a git worktree of the previous release trains a tokenizer and a generator; ~1 min
def test_a_generator_finished_by_the_previous_release_is_continued(tmp_path):
    """An upgrade does not make the researcher pay again: a generator that the previous release
    finished is continued by this one, and its old IS point keeps the name of its split rule."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from core.config import load_config
    from core.eval.fid import IS_RULE, LEGACY_IS_RULE
    from core.generate import generate

    repo = Path(__file__).resolve().parents[2]
    if subprocess.run(["git", "-C", str(repo), "cat-file", "-e", PREVIOUS_RELEASE], capture_output=True).returncode:
        pytest.skip(f"commit {PREVIOUS_RELEASE[:7]} is not in this clone's history")
    tree = {"data": {"image_size": 32, "batch_size": 8, "train_size": 64, "val_size": 16},
            "model": {"patch_size": 8, "latent_size": 4, "latent_channels": 8}, "loss": {"perceptual": 0.0},
            "optim": {"warmup_steps": 2}, "train": {"steps": 2, "log_every": 1, "ckpt_every": 100, "device": "cpu"},
            "eval": {"batch_size": 16}, "generator": {"steps": 6, "batch_size": 8, "num_samples": 16, "sample_steps": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    old, site = tmp_path / "old", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_STRIP_EDITABLE)
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(old), PREVIOUS_RELEASE], check=True,
                   capture_output=True)
    try:
        script = ("import torch; torch.set_num_threads(1)\n"
                  "import core.generate; assert core.generate.__file__.startswith(%r)\n"
                  "from core.config import load_config; from core.train import train\n"
                  "cfg = load_config(%r); train(cfg, %r); core.generate.generate(cfg, %r, %r)\n"
                  % (str(old), str(tmp_path / "cfg.yaml"), str(tmp_path / "tok"), str(tmp_path / "tok"),
                     str(tmp_path / "gen")))
        subprocess.run([sys.executable, "-c", script], cwd=old, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{old}"})
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(old)], capture_output=True)
    logged = len(_log(tmp_path / "gen"))

    torch.set_num_threads(1)
    longer = load_config(tmp_path / "cfg.yaml", {"generator.steps": 12, "generator.eval_at": [9]})
    result = generate(longer, tmp_path / "tok", tmp_path / "gen")
    assert [r["step"] for r in _log(tmp_path / "gen")[logged:] if "loss" in r] == list(range(7, 13))
    assert {(m["name"], m["step"]) for m in result["metrics"]} == {
        (n, s) for n in ("gfid", "inception_score") for s in (6, 9, 12)} | {("generator_train_time_s", 12)}
    assert result["info"]["continued_from"] == [6]
    assert result["info"]["inception_score_rules"] == {LEGACY_IS_RULE: [6], IS_RULE: [9, 12]}
