"""Data parallelism on 2 CPU processes (gloo): ranks stay in sync and match one process with the global batch."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from core.config import load_config
from core.models.tokenizer import build_tokenizer, tokenizer_args
from core.seed import seed_everything
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


# ---------------------------------------------------------------------------- SSL and fine-tuning

SSL = {"ssl.method": "ibot", "ssl.out_dim": 32, "ssl.hidden_dim": 32, "ssl.bottleneck_dim": 16, "ssl.local_crops": 2,
       "ssl.mask_prob": 1.0, "train.steps": 4, "train.log_every": 1}
# The paper's epoch recipe on 64 images with a global batch of 8: 8 steps per epoch, so 0.5 epochs = 4 steps,
# discriminator from step 1, adversarial loss from step 2.  The same config runs on 1 and on 2 ranks.
FINETUNE = {"finetune.enabled": True, "finetune.epochs": 0.5, "finetune.warmup_epochs": 0.125,
            "finetune.disc_start_epoch": 0.125, "finetune.adv_start_epoch": 0.25, "finetune.batch_size": 8,
            "finetune.disc_image_size": 32, "loss.adversarial": 0.75, "optim.weight_decay": 0.0,
            "train.ckpt_every": 2, "train.log_every": 1}


def _job_worker(rank: int, world: int, port: int, job: str, cfg_tree: dict, out_dir: str) -> None:
    """Runs ``job`` on this rank and saves what the test compares (every rank's own copy)."""
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(cfg_tree)
    info = D.init_distributed("cpu")
    out = Path(out_dir)
    try:
        saved = {}
        for name, stops in (("straight", [None]), ("resumed", [2, None])):  # resumed: stop at 2, fresh trainer
            if job == "ssl" and name == "resumed":
                continue
            run_dir = out / f"{job}-{name}"
            run_dir.mkdir(exist_ok=True)
            D.barrier(info)
            for stop in stops:
                trainer, _, _ = build_trainer(cfg, run_dir, info)
                trainer.resume()
                trainer.run(stop)
            saved[name] = {"model": trainer.model.state_dict(), "objectives": trainer.objectives[1].state_dict(),
                           "steps": trainer.cfg.train.steps, "batch": trainer.cfg.data.batch_size}
        torch.save(saved, out / f"{job}-rank{rank}.pt")
    finally:
        D.cleanup(info)


def _spawn(job: str, cfg, tmp_path) -> list[dict]:
    mp.spawn(_job_worker, args=(2, _free_port(), job, cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{job}-rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_equal(a, b, what):
    if isinstance(a, dict):
        for k in a:
            _assert_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def _norm(a: dict, b: dict, keys: list[str]) -> float:
    """Euclidean norm of a - b over the tensors ``keys``."""
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys) ** 0.5


@pytest.mark.slow  # two spawned processes; ~25 s
def test_two_rank_ssl_training_matches_single_process(tiny_config, tmp_path):
    """Crops/masks are this rank's rows of the global batch's (core.seed.BatchRNG): the ranks crop
    differently, yet 2 ranks x 4 images train like 1 process x 8 (before: both ranks cropped image j
    alike, and the result differed from one process)."""
    ranks = _spawn("ssl", tiny_config(**SSL, **{"data.batch_size": 4}), tmp_path)
    _assert_equal(ranks[0]["straight"], ranks[1]["straight"], "rank0 vs rank1")  # weights, heads, teacher, centres
    train(tiny_config(**SSL), tmp_path / "single")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    ddp = ranks[0]["straight"]
    for name, w in ddp["model"].items():
        assert torch.allclose(w, single["model"][name], rtol=1e-4, atol=1e-5), f"2 ranks differ from one process at {name}"
    for name, w in ddp["objectives"]["teacher"].items():
        assert torch.allclose(w, single["objectives"][1]["teacher"][name], rtol=1e-4, atol=1e-5), name


@pytest.mark.slow  # two spawned processes, three short runs each; ~40 s
def test_two_rank_finetuning_keeps_one_discriminator_matches_one_process_and_resumes_exactly(tiny_config, tmp_path):
    cfg = tiny_config(**FINETUNE)
    ranks = _spawn("finetune", cfg, tmp_path)
    r0, r1 = ranks[0]["straight"], ranks[1]["straight"]
    assert (r0["steps"], r0["batch"]) == (4, 4)  # 0.5 epochs of 64 images at global batch 8, split over 2 ranks
    # one discriminator: heads (with spectral-norm vectors) and AdamW state identical on both ranks
    _assert_equal(r0["objectives"], r1["objectives"], "discriminator rank0 vs rank1")
    _assert_equal(r0["model"], r1["model"], "tokenizer rank0 vs rank1")
    # stop at step 2 + a fresh trainer resuming from rank 0's checkpoint = the straight run, bit for bit
    for rank in ranks:
        _assert_equal(rank["straight"], rank["resumed"], "straight vs resumed")
    # one process, same config (global batch 8 on one rank): equal up to the heads' per-rank BatchNorm statistics
    train(cfg, tmp_path / "single")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    assert single["step"] == 4
    seed_everything(cfg.train.seed)
    init = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size)).state_dict()  # the runs' initial weights
    dec = [k for k in init if k.startswith("decoder.")]
    moved = _norm(single["model"], init, dec)
    print(f"decoder: |2 ranks - 1 process| / |1 process - init| = {_norm(r0['model'], single['model'], dec) / moved:.3g}")
    assert _norm(r0["model"], single["model"], dec) < 0.1 * moved
    assert _norm(r0["model"], single["model"], [k for k in init if k.startswith("encoder.")]) == 0  # frozen
