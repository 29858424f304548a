"""The example run configs in configs/: they validate, and the tiny one trains via the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "s16_joint.yaml"])
def test_config_validates(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.encoder_size in ("micro", "S")


def test_s16_joint_is_the_paper_recipe():
    cfg = load_config(CONFIGS / "s16_joint.yaml")
    assert (cfg.model.encoder_size, cfg.model.decoder_size, cfg.model.patch_size) == ("S", "S", 16)
    assert cfg.data.image_size == 256 and cfg.model.split_depth is None  # k = 12: vanilla
    assert (cfg.model.latent_size, cfg.model.latent_channels) == (8, 128)  # f32, c = 128
    assert cfg.ssl.method == "ibot" and cfg.loss.ssl == 0.1 and cfg.model.class_token
    assert not cfg.finetune.enabled and cfg.loss.adversarial == 0.0  # joint phase
    # 50 epochs of ImageNet-1K at global batch 512 (8 processes x 64), 5 warm-up epochs
    assert cfg.train.steps == 50 * 2503 and cfg.optim.warmup_steps == 5 * 2503
    assert cfg.data.batch_size * 8 == 512


def test_tiny_cpu_trains_via_cli(tmp_path):
    """``python -m core.train configs/tiny_cpu.yaml --run-dir DIR`` (a few steps), as README shows."""
    run_dir = tmp_path / "tokenizer"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "core.train", str(CONFIGS / "tiny_cpu.yaml"), "--run-dir", str(run_dir),
           "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "train.ckpt_every=2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    names = {m["name"] for m in result["metrics"]}
    assert {"train_loss", "gflops_total"} <= names
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert (run_dir / "config.yaml").exists() and sorted((run_dir / "checkpoints").glob("step_*"))
