"""Joint SSL training through the real trainer: exact resume, then the fine-tuning phase
chained from its checkpoint (``finetune.init_from``) with exact resume and phase switches."""
import json

import pytest
import torch

from core.config import load_config
from core.train import train
from core.trainer.checkpoint import load_checkpoint

BASE = {
    "data.image_size": 16, "data.train_size": 64, "data.batch_size": 8, "data.num_classes": 4,
    "model.patch_size": 4, "model.latent_size": 2, "model.split_depth": 2, "model.latent_channels": 4,
    "loss.perceptual": 0.0, "train.steps": 4, "train.ckpt_every": 2, "train.log_every": 1, "train.device": "cpu",
    "ssl.method": "ibot", "ssl.out_dim": 32, "ssl.hidden_dim": 32, "ssl.bottleneck_dim": 16,
    "ssl.local_crops": 2, "ssl.warmup_teacher_temp_steps": 3, "ssl.freeze_last_layer_steps": 1,
    "optim.warmup_steps": 1,
}
FINETUNE = {
    "finetune.enabled": True, "finetune.epochs": None, "loss.ssl": 0.0, "loss.adversarial": 0.75, "finetune.disc_start_step": 1,
    "finetune.adv_start_step": 2, "finetune.disc_image_size": 32, "optim.weight_decay": 0.0, "optim.lr": 2e-4,
}


def _final(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def joint_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl")
    cfg = load_config(None, BASE)
    straight, resumed = root / "straight", root / "resumed"
    train(cfg, straight)
    assert train(cfg, resumed, stop_at_step=2)["stopped_at"] == 2
    train(cfg, resumed)
    return cfg, straight, resumed


def test_joint_ssl_resume_is_exact(joint_runs):
    cfg, straight, resumed = joint_runs
    a, b = _final(straight), _final(resumed)
    assert a["step"] == b["step"] == 4
    _assert_same(a["model"], b["model"], "model")
    _assert_same(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    ssl_a, ssl_b = a["objectives"][1], b["objectives"][1]  # [reconstruction, ssl]
    _assert_same(ssl_a, ssl_b, "ssl")  # teacher, heads, both centres
    assert ssl_a["loss"]["center"].abs().sum() > 0 and ssl_a["loss"]["patch_center"].abs().sum() > 0
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[0]["ssl_teacher_temp"] == pytest.approx(0.04) and log[3]["ssl_teacher_temp"] == pytest.approx(0.07)
    assert all(r["ssl_cls"] > 0 and "ssl_mim" in r for r in log)


def test_finetune_chains_from_joint_checkpoint_and_resumes_exactly(joint_runs, tmp_path):
    _, straight_joint, _ = joint_runs
    cfg = load_config(None, {**BASE, **FINETUNE, "finetune.init_from": str(straight_joint)})
    assert cfg.model.class_token  # ssl.method kept: same architecture as the joint run
    straight, resumed = tmp_path / "ft_straight", tmp_path / "ft_resumed"
    result = train(cfg, straight)
    train(cfg, resumed, stop_at_step=3)
    train(cfg, resumed)
    a, b = _final(straight), _final(resumed)
    _assert_same(a["model"], b["model"], "model")
    _assert_same(a["objectives"], b["objectives"], "objectives")  # discriminator heads + its optimizer
    joint = _final(straight_joint)["model"]
    for k, v in a["model"].items():
        if k.startswith("encoder."):
            assert torch.equal(v, joint[k]), f"encoder moved: {k}"
    assert any(not torch.equal(v, joint[k]) for k, v in a["model"].items() if k.startswith("decoder."))
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    # step record N covers optimizer step N-1: D from step 1, generator loss from step 2
    assert "adv_g" not in log[0] and "adv_g" not in log[1] and "adv_g" in log[2]
    assert "adv_d" not in log[0] and "adv_d" not in log[1] and "adv_d" in log[2]
    assert a["objectives"][1]["backbone"] == "substitute-random-vit-ti8"
    assert result["info"]["objective_backbones"] == {"FinetuneObjective": "substitute-random-vit-ti8"}
