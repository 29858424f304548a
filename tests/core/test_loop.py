"""One loop for the tokenizer and the generator (issue 18 §1): the bugs of the former second loop.

* a generator resumed after a crash logs each step once (log lines after the checkpoint dropped),
  also when it continues to a larger ``generator.steps``, and ends bit-identical to one longer run;
* a non-finite loss stops the generator with the tokenizer's error;
* the check is reduced over ranks first: with a NaN on one rank of two, both raise (issue 20 §1).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from core.config import GeneratorConfig, load_config
from core.generator.train import train_generator

GEN = {"size": "micro", "batch_size": 8, "lr": 1e-3, "ema": 0.9}
NONFINITE = r"non-finite loss in steps"


def _latents():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, 4, 4, generator=g), torch.randint(0, 2, (32,), generator=g)


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


class Crash(RuntimeError):
    pass


def test_resumed_generator_logs_each_step_once_and_continues_to_more_steps_exactly(tmp_path):
    latents, labels = _latents()
    seen = []

    def evaluate(ema, step):
        seen.append(step)
        if step == 5 and seen.count(5) == 1:
            raise Crash("evaluation died")  # after step 5 was logged, before its checkpoint
        return [{"name": "probe", "value": float(step), "step": step, "backbone": None, "num_samples": 1}]

    run = lambda path, steps, **kw: train_generator(GeneratorConfig(**GEN, steps=steps, eval_at=[5]), latents,  # noqa: E731
                                                    labels, 2, path, seed=3, log_every=1, ckpt_every=4, **kw)
    straight = run(tmp_path / "straight", 8, evaluate=lambda ema, step: [])
    with pytest.raises(Crash):
        run(tmp_path / "crashed", 6, evaluate=evaluate)
    assert _steps(tmp_path / "crashed" / "log.jsonl") == [1, 2, 3, 4, 5]  # checkpoint at 4
    run(tmp_path / "crashed", 6, evaluate=evaluate)  # resumes at 4, finishes 6 steps
    resumed = run(tmp_path / "crashed", 8, evaluate=evaluate)  # generator.steps raised: continues to 8
    assert _steps(tmp_path / "crashed" / "log.jsonl") == list(range(1, 9))
    assert [r["step"] for r in resumed["metrics"]] == [5, 6, 8] and seen == [5, 5, 6, 8]
    for key in ("model", "ema"):
        for (name, a), b in zip(straight[key].state_dict().items(), resumed[key].state_dict().values()):
            assert torch.equal(a, b), (key, name)  # the learning rate does not depend on generator.steps


def test_nan_loss_stops_the_generator_with_the_tokenizers_error(tiny_config, tmp_path, monkeypatch):
    latents, labels = _latents()
    latents[3] = float("nan")
    with pytest.raises(FloatingPointError, match=NONFINITE):
        train_generator(GeneratorConfig(**GEN, steps=40), latents, labels, 2, tmp_path / "gen", seed=3,
                        log_every=20, ckpt_every=100)
    assert not (tmp_path / "gen" / "log.jsonl").exists()  # stopped at the first log step, nothing logged

    import core.train as entry

    build = entry.build_objectives
    monkeypatch.setattr(entry, "build_objectives", lambda *a: build(*a) + [NanObjective(step=1)])
    with pytest.raises(FloatingPointError, match=NONFINITE):
        entry.train(tiny_config(**{"train.steps": 4}), tmp_path / "tok")


class NanObjective:
    """Adds NaN to the loss from ``step`` on, on ``rank`` only (None: every rank)."""

    def __init__(self, step: int = 0, rank: int | None = None, this_rank: int = 0):
        self.step, self.on = step, rank is None or rank == this_rank

    def modules(self):
        return {}

    def loss(self, model, images, labels, step):
        bad = self.on and step >= self.step
        return images.mean() * (float("nan") if bad else 0.0), {}

    def after_step(self, model, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nan_worker(rank: int, port: int, cfg_tree: dict, out: str) -> None:
    from core.train import build_trainer
    from core.trainer import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        trainer, _, _ = build_trainer(load_config(cfg_tree), Path(out) / "run", info)
        trainer.objectives.append(NanObjective(rank=1, this_rank=rank))
        trainer.run()
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 — the test compares what each rank raised
        outcome = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    D.cleanup(info)


@pytest.mark.slow  # two spawned processes; ~20 s
def test_nan_on_one_rank_stops_every_rank(tiny_config, tmp_path):
    cfg = tiny_config(**{"data.batch_size": 4, "train.steps": 4, "train.log_every": 1})
    (tmp_path / "run").mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_nan_worker, args=(r, port, cfg.model_dump(mode="json"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still waiting in a collective"
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for text in outcomes:
        assert text.startswith("FloatingPointError") and "non-finite loss in steps 1..1" in text, outcomes
