"""Exact resume: N straight steps == N/2 steps + stop (or SIGKILL) + resume, bit for bit, on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.config import save_config
from core.train import train
from core.trainer import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in ("exp_avg", "exp_avg_sq", "step")), f"optimizer state {i}"
    assert a["step"] == b["step"] and a["data"] == b["data"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_stop_and_resume_is_exact(tiny_config, tmp_path):
    # 64 images / batch 8 = 8 batches per epoch: 10 steps cross an epoch boundary.
    cfg = tiny_config(**{"train.steps": 10, "optim.ema": 0.8})
    train(cfg, tmp_path / "straight")
    stopped = train(cfg, tmp_path / "resumed", stop_at_step=5)
    assert stopped["stopped_at"] == 5 and not (tmp_path / "resumed" / "result.json").exists()
    result = train(cfg, tmp_path / "resumed")
    ckpt = lambda d: load_checkpoint(tmp_path / d / "checkpoints" / "latest.pt")
    _assert_same_state(ckpt("straight"), ckpt("resumed"))
    straight_log = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]
    assert [r["step"] for r in strip(resumed_log)] == [2, 4, 5, 6, 8, 10]  # 5: the stop point's record
    assert strip(resumed_log)[-1] == strip(straight_log)[-1]
    assert result["metrics"][0]["value"] == json.loads(straight_log[-1])["loss"]


def test_ssl_stop_and_resume_is_exact(tiny_config, tmp_path):
    """With a plugged-in objective (iBOT: random crops/masks, EMA teacher, centers) too."""
    cfg = tiny_config(**{"train.steps": 6, "ssl.method": "ibot", "ssl.out_dim": 64, "ssl.hidden_dim": 64,
                         "ssl.bottleneck_dim": 32, "ssl.local_crops": 1, "model.patch_size": 4,
                         "model.split_depth": 2})
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_at_step=3)
    train(cfg, tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "latest.pt") for d in ("straight", "resumed"))
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    flat = lambda tree: torch.cat([t.flatten().float() for t in _tensors(tree)])
    assert torch.equal(flat(a["objectives"][1]), flat(b["objectives"][1]))  # heads, teacher, loss centers


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for key in sorted(tree):
            yield from _tensors(tree[key])


@pytest.fixture
def one_thread():
    """The killed run is a fresh process with one thread; match it so the sums agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # a fresh python process (imports dominate); ~15 s on an idle 2-core machine
def test_sigkill_and_resume_is_exact(tiny_config, tmp_path, one_thread):
    """``python -m core.train`` killed with SIGKILL right after its first checkpoint file appears,
    then resumed, ends bit-identical to a straight run."""
    cfg = tiny_config(**{"train.steps": 15, "train.ckpt_every": 3, "train.log_every": 3, "optim.ema": 0.9})
    cfg_path = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(cfg, straight)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "core.train", str(cfg_path), "--run-dir", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "step_00000003.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    killed_at = load_checkpoint(latest_checkpoint(killed / "checkpoints"))["step"]
    assert 3 <= killed_at < 15

    result = train(cfg, killed)  # resumes from the newest checkpoint
    assert result["stage"] == "tokenizer"
    _assert_same_state(load_checkpoint(straight / "checkpoints" / "latest.pt"),
                       load_checkpoint(killed / "checkpoints" / "latest.pt"))
