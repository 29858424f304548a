"""Trainer parts (schedule, optimizer groups, EMA, checkpoints, objectives) and the train() entry."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from core.config import ConfigError
from core.models.tokenizer import build_tokenizer, tokenizer_args
from core.models.load import load_tokenizer
from core.train import main, train
from core.trainer import EMA, build_optimizer, cosine_lr, load_checkpoint, save_checkpoint, train_step
from core.trainer.distributed import DistInfo
from core.trainer.objective import Objective, ReconstructionObjective

METRICS = {"train_loss", "params_encoder", "params_decoder", "gflops_encoder", "gflops_decoder", "gflops_total",
           "train_time_s", "encoder_depth"}


def test_cosine_schedule():
    lr = lambda s: cosine_lr(s, total_steps=11, warmup_steps=4, lr=1.0, min_lr=0.1)
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0 and lr(10) == pytest.approx(0.1) and lr(50) == pytest.approx(0.1)
    assert lr(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    tail = [lr(s) for s in range(4, 11)]
    assert all(a > b for a, b in zip(tail, tail[1:]))


def test_optimizer_decays_only_matrices(tiny_config):
    cfg = tiny_config(**{"model.class_token": True})
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    model.decoder.to_pixels.requires_grad_(False)
    opt = build_optimizer({"model": model}, cfg.optim)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.mask_token", "decoder.pos_embed",
                 "encoder.norm.weight", "encoder.blocks1.0.attn.qkv.bias"):
        assert wd[id(named[name])] == 0.0, name
    for name in ("encoder.blocks1.0.attn.qkv.weight", "encoder.patch_embed.weight"):
        assert wd[id(named[name])] == cfg.optim.weight_decay, name
    assert id(named["decoder.to_pixels.weight"]) not in wd  # frozen: not optimised
    assert opt.defaults["betas"] == tuple(cfg.optim.betas)


def test_ema_update_matches_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow.weight, 0.9 * before + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.shadow.parameters())
    with pytest.raises(ValueError, match="optim.ema"):
        EMA(model, decay=1.0)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["latest.pt", "step_00000006.pt", "step_00000008.pt"]  # no temp files left
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 8
    with pytest.raises(FileNotFoundError, match="step_00000002.pt"):
        load_checkpoint(tmp_path / "step_00000002.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pt"):
        load_checkpoint(tmp_path / "broken.pt")


def test_train_step_fits_a_batch_and_clips(tiny_config):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    objectives = [ReconstructionObjective(cfg.loss)]
    opt = build_optimizer({"model": model}, cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.zeros(4, dtype=torch.long)
    losses = [train_step(model, objectives, opt, params, x, y, s, 3e-3, 1e-3, False, DistInfo())["loss"]
              for s in range(8)]
    assert losses[-1] < losses[0]
    # With clip 1e-3 the applied gradient has norm 1e-3 while the logged norm is the raw one.
    logs = train_step(model, objectives, opt, params, x, y, 8, 3e-3, 1e-3, False, DistInfo())
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    assert logs["grad_norm"] > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)
    bf16 = train_step(model, objectives, opt, params, x, y, 9, 3e-3, 1.0, True, DistInfo())
    assert math.isfinite(bf16["loss"])


class ProbeObjective:
    """A plugged-in objective with its own trainable module (a linear classifier on latents)."""

    def __init__(self):
        self.head = nn.Linear(8, 10)
        self.calls = 0

    def modules(self):
        return {"probe_head": self.head}

    def loss(self, model, images, labels, step):
        z = model.encode(images).mean(dim=(2, 3))
        ce = nn.functional.cross_entropy(self.head(z.float()), labels)
        return 0.1 * ce, {"probe_ce": float(ce.detach())}

    def after_step(self, model, step):
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_plugged_objective_is_trained_and_checkpointed(tiny_config, tmp_path, monkeypatch):
    import core.train as entry

    probe = ProbeObjective()
    assert isinstance(probe, Objective)
    head_before = probe.head.weight.detach().clone()
    build = entry.build_objectives
    monkeypatch.setattr(entry, "build_objectives",
                        lambda cfg, model, device, info=None: build(cfg, model, device, info) + [probe])
    train(tiny_config(**{"train.steps": 4}), tmp_path)
    assert not torch.equal(probe.head.weight, head_before)  # in the optimizer
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert ckpt["objectives"][1] == {"calls": 4}
    assert "probe_ce" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])


def test_train_writes_outputs_and_is_idempotent(tiny_config, tmp_path):
    cfg = tiny_config(**{"optim.ema": 0.9, "train.keep_last": 2})
    result = train(cfg, tmp_path)
    assert result["stage"] == "tokenizer" and {m["name"] for m in result["metrics"]} == METRICS
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    assert metrics["params_encoder"] == model.num_params()["encoder"]
    assert metrics["gflops_total"] == pytest.approx(metrics["gflops_encoder"] + metrics["gflops_decoder"])
    assert result["info"]["seed"] == 0 and result["info"]["perceptual_backbone"] is None
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.pt", "step_00000004.pt", "step_00000006.pt"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert {"loss", "l1", "lr", "grad_norm", "time"} <= set(log[-1]) and metrics["train_loss"] == log[-1]["loss"]
    assert json.loads((tmp_path / "result.json").read_text()) == result
    # Second call: returns the result, trains nothing.
    mtime = (tmp_path / "checkpoints" / "latest.pt").stat().st_mtime_ns
    assert train(cfg, tmp_path) == result
    assert (tmp_path / "checkpoints" / "latest.pt").stat().st_mtime_ns == mtime
    # load_tokenizer: EMA weights by default, raw weights on request.
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    tok, tok_cfg = load_tokenizer(tmp_path)
    assert tok_cfg == cfg and not tok.training
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in tok.state_dict().items())
    raw, _ = load_tokenizer(tmp_path, ema=False)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in raw.state_dict().items())
    assert not torch.equal(ckpt["ema"]["decoder.to_pixels.weight"], ckpt["model"]["decoder.to_pixels.weight"])


def test_run_dir_of_another_config_is_refused(tiny_config, tmp_path):
    train(tiny_config(**{"train.steps": 2}), tmp_path, stop_at_step=1)
    with pytest.raises(ConfigError, match="different config"):
        train(tiny_config(**{"train.steps": 2, "optim.lr": 0.5}), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_tokenizer(tmp_path / "nowhere")


def test_cli(tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("data: {image_size: 32, batch_size: 8, train_size: 32}\nloss: {perceptual: 0.0}\n"
                        "model: {patch_size: 8, latent_channels: 8}\n")
    run_dir = tmp_path / "run"
    assert main([str(cfg_file), "--run-dir", str(run_dir), "--set", "train.steps=2", "--set", "train.device=cpu"]) == 0
    assert (run_dir / "result.json").is_file() and (run_dir / "config.yaml").is_file()
    assert main([str(cfg_file), "--run-dir", str(run_dir), "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err
    assert main([str(cfg_file), "--run-dir", str(run_dir), "--set", "novalue"]) == 2


@pytest.mark.skipif(not os.path.exists("core/assets/featnet_v1.pt"), reason="embedded featnet weights not built yet")
def test_perceptual_backbone_is_recorded(tiny_config, tmp_path):
    result = train(tiny_config(**{"train.steps": 2, "loss.perceptual": 1.0}), tmp_path)
    loss = next(m for m in result["metrics"] if m["name"] == "train_loss")
    assert result["info"]["perceptual_backbone"] == loss["backbone"] == "lpips-substitute-percepnet-v1"
    assert "perceptual" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])


def test_loader_workers_do_not_change_training(tiny_config, tmp_path):
    runs = {}
    for workers in (0, 2):
        train(tiny_config(**{"train.steps": 3, "data.num_workers": workers}), tmp_path / str(workers))
        runs[workers] = load_checkpoint(tmp_path / str(workers) / "checkpoints" / "latest.pt")["model"]
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_random_hflip_is_per_image_per_step_and_rank_rows_of_the_global_batch():
    from core.trainer.distributed import DistInfo
    from core.trainer.loop import random_hflip

    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = random_hflip(x, seed=0, step=3, dist_info=DistInfo())
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    assert all(f or torch.equal(o, xi) for f, o, xi in zip(flipped, out, x)) and 0 < sum(flipped) < 8
    assert torch.equal(out, random_hflip(x, seed=0, step=3, dist_info=DistInfo()))  # a function of (seed, step)
    assert not torch.equal(out, random_hflip(x, seed=0, step=4, dist_info=DistInfo()))
    for r in range(2):  # rank r of 2 flips its rows r, r + 2, ... exactly as one process flips them
        assert torch.equal(random_hflip(x[r::2], 0, 3, DistInfo(rank=r, world_size=2)), out[r::2])


def test_non_finite_loss_stops_the_run_at_the_next_log_step(tiny_config, tmp_path):
    cfg = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "train.log_every": 2, "optim.grad_clip": 0.0})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(cfg, tmp_path)
