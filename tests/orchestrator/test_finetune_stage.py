"""Joint training -> decoder fine-tuning -> evaluation as chained stages of one run (paper App. A)."""
import json

import torch
import yaml

from core.config import finetune_phase, joint_phase, load_config
from orchestrator.cli import main
from orchestrator.db.store import Store


def test_phase_configs_follow_table7():
    cfg = load_config(overrides={"finetune.enabled": True, "finetune.steps": 7, "loss.ssl": 0.1})
    joint = joint_phase(cfg)
    assert joint.finetune.enabled is False and joint.loss.ssl == 0.1
    ft = finetune_phase(cfg, "/runs/x/tokenizer")
    assert ft.finetune.enabled and ft.finetune.init_from == "/runs/x/tokenizer"
    assert (ft.loss.ssl, ft.loss.adversarial) == (0.0, 0.75)
    assert (ft.optim.lr, ft.optim.min_lr, ft.optim.weight_decay, ft.train.steps) == (2e-4, 2e-5, 0.0, 7)
    assert ft.model == cfg.model and ft.data == cfg.data


def test_finetune_stage_chains_from_the_tokenizer_and_feeds_evaluation(tmp_path):
    doc = {
        "name": "ft",
        "base": {
            "data": {"image_size": 32, "train_size": 64, "val_size": 32, "batch_size": 8},
            "model": {"latent_channels": 8},
            "loss": {"perceptual": 0.0},
            "train": {"steps": 4, "ckpt_every": 2, "device": "cpu"},
            "finetune": {"steps": 4, "disc_start_step": 1, "adv_start_step": 2, "disc_image_size": 32},
            "eval": {"num_samples": 32, "probe_train": 32, "probe_val": 16, "batch_size": 16},
        },
        "axes": {"model.patch_size": [8]},
        "stages": {"tokenizer": {"needs": []}, "finetune": {"needs": ["tokenizer"]},
                   "evaluate": {"needs": ["finetune"]}},
        "executor": "debug",
        "runs_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url]) == 0
    (run,) = Store(url).runs(sweep="ft")
    assert run.status == "finished"
    root = tmp_path / "runs" / "ft" / run.run_hash
    joint = torch.load(root / "tokenizer" / "checkpoints" / "latest.pt", weights_only=False)["model"]
    tuned = torch.load(root / "finetune" / "checkpoints" / "latest.pt", weights_only=False)["model"]
    enc = [k for k in joint if k.startswith("encoder.")]
    dec = [k for k in joint if k.startswith("decoder.")]
    assert all(torch.equal(joint[k], tuned[k]) for k in enc)  # encoder frozen in phase 2
    assert any(not torch.equal(joint[k], tuned[k]) for k in dec)  # decoder trained
    ft_cfg = yaml.safe_load((root / "finetune" / "config.yaml").read_text())
    assert ft_cfg["finetune"]["enabled"] and ft_cfg["loss"]["adversarial"] == 0.75
    ev = json.loads((root / "evaluate" / "result.json").read_text())
    assert {"kind": "tokenizer", "path": str((root / "finetune").resolve())} in ev["artifacts"]
