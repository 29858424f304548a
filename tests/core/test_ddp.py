"""Data parallelism on 2 CPU processes (gloo): ranks stay in sync and match one process with the global batch."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from core.config import load_config
from core.train import build_trainer, train
from core.trainer import distributed as D
from core.trainer import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_tree: dict, run_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(cfg_tree)
    info = D.init_distributed("cpu")
    try:
        assert info.enabled and info.rank == rank
        trainer, _, seed = build_trainer(cfg, run_dir, info)
        trainer.run()
        torch.save({"model": trainer.model.state_dict(), "seed": seed}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup(info)


@pytest.mark.slow  # two spawned processes (imports dominate); ~20 s on an idle 2-core machine
def test_two_rank_training_matches_single_process(tiny_config, tmp_path):
    steps = 6
    # Two ranks with 4 images each see, per step, exactly the 8 images of the single run.
    ddp_cfg = tiny_config(**{"train.steps": steps, "data.batch_size": 4, "train.log_every": 1})
    single_cfg = tiny_config(**{"train.steps": steps, "data.batch_size": 8, "train.log_every": 1})
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), ddp_cfg.model_dump(mode="json"), str(run_dir), str(tmp_path)),
             nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (rank0["seed"], rank1["seed"]) == (0, 1)  # seed_everything(seed, rank)
    for name, w in rank0["model"].items():
        assert torch.equal(w, rank1["model"][name]), f"ranks diverged at {name}"

    # Only rank 0 wrote the checkpoint and the log (one record per step, not two).
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert log[-1]["loss"] < log[0]["loss"]

    train(single_cfg, tmp_path / "single")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")["model"]
    for name, w in rank0["model"].items():
        assert torch.allclose(w, single[name], rtol=1e-4, atol=1e-5), f"DDP differs from one process at {name}"
