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
       "ssl.mask_prob": 1.0, "train.steps": 4, "train.log_every": 1, "train.ckpt_every": 2}
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


@pytest.mark.slow  # two spawned processes; ~35 s
def test_two_rank_ssl_training_matches_single_process_and_resumes_exactly(tiny_config, tmp_path):
    """Crops/masks are this rank's rows of the global batch's (core.seed.BatchRNG): the ranks crop
    differently, yet 2 ranks x 4 images train like 1 process x 8 (before: both ranks cropped image j
    alike, and the result differed from one process)."""
    ranks = _spawn("ssl", tiny_config(**SSL, **{"data.batch_size": 4}), tmp_path)
    _assert_equal(ranks[0]["straight"], ranks[1]["straight"], "rank0 vs rank1")  # weights, heads, teacher, centres
    for rank in ranks:  # stop at step 2 + a fresh trainer resuming from rank 0's checkpoint = straight, bit for bit
        _assert_equal(rank["straight"], rank["resumed"], "straight vs resumed")
    train(tiny_config(**SSL), tmp_path / "single")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    ddp = ranks[0]["straight"]
    for name, w in ddp["model"].items():
        assert torch.allclose(w, single["model"][name], rtol=1e-4, atol=1e-5), f"2 ranks vs one process: {name}"
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
    ratio = _norm(r0["model"], single["model"], dec) / moved  # measured 0.064 (per-rank BatchNorm in D)
    assert ratio < 0.1, f"decoder: |2 ranks - 1 process| / |1 process - init| = {ratio:.3g}"
    assert _norm(r0["model"], single["model"], [k for k in init if k.startswith("encoder.")]) == 0  # frozen


# ---------------------------------------------------------------------------- generator

GEN = {"size": "micro", "steps": 6, "batch_size": 8, "lr": 1e-3, "ema": 0.9, "eval_at": [2]}
GEN_STAGE = {"data.train_size": 64, "data.val_size": 32, "data.batch_size": 16, "loss.perceptual": 0.0,
             "train.steps": 4, "train.ckpt_every": 4, "train.device": "cpu", "eval.batch_size": 32,
             "generator.steps": 4, "generator.batch_size": 16, "generator.num_samples": 32,
             "generator.sample_steps": 2}


def _latents():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, 4, 4, generator=g), torch.randint(0, 2, (32,), generator=g)


def _generator_run(path, stop=None, info=None, evaluate=None):
    from core.config import GeneratorConfig
    from core.generator.train import train_generator

    latents, labels = _latents()
    return train_generator(GeneratorConfig(**GEN), latents, labels, 2, path, seed=3, evaluate=evaluate,
                           ckpt_every=100, stop_at_step=stop, dist_info=info)


def _generator_worker(rank: int, world: int, port: int, out_dir: str, tok_dir: str, stage_tree: dict) -> None:
    from pathlib import Path

    from core.generate import generate

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    out = Path(out_dir)
    calls = []

    def evaluate(ema, step):
        calls.append(step)
        return [{"name": "probe", "value": float(step), "step": step, "backbone": None, "num_samples": 1}]

    try:
        saved = {}
        for name, stops in (("straight", [None]), ("resumed", [4, None])):
            for stop in stops:
                res = _generator_run(out / f"gen-{name}", stop, info, evaluate)
            saved[name] = {"model": res["model"].state_dict(), "ema": res["ema"].state_dict(),
                           "metrics": res["metrics"] if rank == 0 else None}
        saved["calls"] = calls
        # the generator stage itself on 2 ranks: latent caching, training, rank-0 evaluation and result.json
        saved["stage"] = generate(load_config(stage_tree), tok_dir, out / "stage")
        torch.save(saved, out / f"gen-rank{rank}.pt")
    finally:
        D.cleanup(info)


@pytest.mark.slow  # two spawned processes; ~40 s
def test_two_rank_generator_matches_one_process_resumes_exactly_and_runs_the_stage(tmp_path):
    """generator.batch_size is the global batch: 2 ranks x 4 latents take the steps of 1 process x 8
    (flow noise drawn for the global batch, gradients averaged); stop + resume is exact on both ranks."""
    from core.train import train

    stage_cfg = load_config(overrides=GEN_STAGE)
    train(stage_cfg, tmp_path / "tok")
    mp.spawn(_generator_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "tok"),
                                      stage_cfg.model_dump(mode="json")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"gen-rank{r}.pt", weights_only=False) for r in range(2))
    for key in ("model", "ema"):
        _assert_equal(r0["straight"][key], r1["straight"][key], f"{key} rank0 vs rank1")
        for rank in (r0, r1):
            _assert_equal(rank["straight"][key], rank["resumed"][key], f"{key} straight vs resumed")
    assert r0["calls"] == [2, 6, 2, 6] and r0["straight"]["metrics"] == r0["resumed"]["metrics"]
    ckpt = load_checkpoint(tmp_path / "gen-straight" / "checkpoints" / "latest.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 6
    log = [json.loads(line) for line in (tmp_path / "gen-straight" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == 1  # one record per log step (rank 0 writes)

    single = _generator_run(tmp_path / "single")
    for name, w in single["model"].state_dict().items():
        assert torch.allclose(r0["straight"]["model"][name], w, rtol=1e-4, atol=1e-5), f"2 ranks vs one process: {name}"

    for rank in (r0, r1):  # every rank returns the stage's result.json
        assert rank["stage"] == json.loads((tmp_path / "stage" / "result.json").read_text())
    assert r0["stage"]["info"]["world_size"] == 2
    assert {m["name"] for m in r0["stage"]["metrics"]} == {"gfid", "inception_score", "generator_train_time_s"}


# ---------------------------------------------------------------------------- gradient sync overlap

def _overlap_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Three steps of a block + iBOT head whose prototypes are frozen in steps 0-1 (no gradient
    reaches them) and trained in step 2; buckets of ~one layer each."""
    import torch.distributed as dist

    from core.ssl.heads import DINOHead

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        body = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(6)))
        head = DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)
        params = [p for m in (body, head) for p in m.parameters() if p.requires_grad]
        sync = D.GradientSync(params, info, bucket_bytes=32 * 32 * 4)
        in_backward, during = [False], []
        all_reduce = dist.all_reduce

        def observed(*args, **kwargs):  # count the all-reduces that start while backward runs
            during.append(in_backward[0])
            return all_reduce(*args, **kwargs)

        dist.all_reduce = observed
        steps = []
        for step, freeze in enumerate((True, True, False)):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 * step + rank))  # rank's own data
            for p in params:
                p.grad = None
            during.clear()
            sync.start()
            in_backward[0] = True
            head(body(x), freeze_last_layer=freeze).square().mean().backward()
            in_backward[0] = False
            sync.finish()
            synced = [None if p.grad is None else p.grad.clone() for p in params]
            overlapped = sum(during)
            for p in params:  # the reference: the same backward, averaged after it
                p.grad = None
            head(body(x), freeze_last_layer=freeze).square().mean().backward()
            D.average_gradients(params, info)
            ref = [None if p.grad is None else p.grad.clone() for p in params]
            steps.append({"synced": synced, "ref": ref, "overlapped": overlapped, "buckets": len(sync.buckets)})
        dist.all_reduce = all_reduce
        torch.save(steps, os.path.join(out_dir, f"overlap{rank}.pt"))
    finally:
        D.cleanup(info)


@pytest.mark.slow  # two spawned processes; ~20 s on an idle 2-core machine
def test_gradient_sync_overlaps_backward_while_the_prototypes_get_no_gradient(tmp_path):
    """Before: the frozen prototype weight sat in bucket 0, which then never completed, so every
    all-reduce waited for the end of backward (0 overlapped, as measured on the tokenizer)."""
    mp.spawn(_overlap_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"overlap{r}.pt") for r in range(2)]
    for step in range(3):
        for r in ranks:  # bit for bit the mean that average_gradients computes, on both ranks
            s = r[step]
            assert [g is None for g in s["synced"]] == [g is None for g in s["ref"]]
            assert all(g is None or torch.equal(g, h) for g, h in zip(s["synced"], s["ref"])), f"step {step}"
        _assert_equal(ranks[0][step]["synced"], ranks[1][step]["synced"], f"step {step} rank0 vs rank1")
    frozen = ranks[0][1]
    assert sum(g is None for g in frozen["synced"]) == 1  # the prototypes: no gradient, as in one process
    assert frozen["overlapped"] >= frozen["buckets"] - 2, f"{frozen['overlapped']} of {frozen['buckets']} overlapped"
    assert ranks[0][2]["synced"][-1] is not None  # unfrozen: the prototypes' gradient arrives and is reduced
