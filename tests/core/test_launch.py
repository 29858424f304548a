"""Launching data-parallel stages: srun's environment, one launch per run directory, a failed
rank ending the job, and CUDA generator states across launchers with different visible devices."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.trainer.checkpoint import cuda_states_to_restore, rng_state, set_rng_state
from core.trainer.launch import LaunchEnv, first_host, launch_env, torch_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orchestrator"))
from slurm_fixture import slurm_cluster  # noqa: E402,F401  (session fixture: the real local Slurm)

REPO = Path(__file__).resolve().parents[2]
# tests/conftest.py's tiny run, as ``python -m core.train`` overrides
TINY_SET = ["data.image_size=32", "data.batch_size=4", "data.train_size=64", "data.val_size=16", "model.patch_size=8",
            "model.latent_size=4", "model.latent_channels=8", "loss.perceptual=0.0", "optim.warmup_steps=2",
            "train.steps=4", "train.log_every=1", "train.ckpt_every=2", "train.device=cpu"]


# ----------------------------------------------------------------------------- environment

SRUN_STEP = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_STEP_NODELIST": "gpu[008-010]",
             "SLURM_JOB_NUM_NODES": "4", "SLURM_STEP_ID": "0"}


def test_first_host_of_slurm_node_lists():
    assert first_host("vm") == "vm"
    assert first_host("gpu[007-010,001],cpu1") == "gpu007"
    assert first_host("a1,b[2-3]") == "a1"
    assert first_host("rack[1-2]-node[01-04]") == "rack1-node01"


def test_srun_step_is_read_like_submitit_reads_it_and_torchrun_takes_precedence(monkeypatch):
    import submitit

    le = launch_env(SRUN_STEP)
    assert le == LaunchEnv(5, 8, 1, "gpu008", le.master_port, "slurm")
    # submitit's own reading of a Slurm job: same rank, world, local rank and port
    for k in list(os.environ):
        if k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK")):
            monkeypatch.delenv(k)
    for k, v in {**SRUN_STEP, "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(k, v)
    ref = submitit.helpers.TorchDistributedEnvironment()
    assert (ref.rank, ref.world_size, ref.local_rank, ref.master_port) == (5, 8, 1, le.master_port)

    torchrun = {**SRUN_STEP, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                "MASTER_PORT": "29500"}
    assert launch_env(torchrun) == LaunchEnv(3, 4, 3, "h", 29500, "torchrun")
    # the batch script of ``sbatch --ntasks=8`` is one process, not rank 0 of 8 waiting for 7 others
    batch = {k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_STEP")}
    assert launch_env(batch) == LaunchEnv()
    with pytest.raises(RuntimeError, match="SLURM_PROCID='x'"):
        launch_env({**SRUN_STEP, "SLURM_PROCID": "x"})


def test_exported_variables_fill_only_what_is_missing_and_leave_cuda_devices_alone():
    env = {**SRUN_STEP, "MASTER_PORT": "12345", "CUDA_VISIBLE_DEVICES": "3"}
    out = torch_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu008"}
    assert launch_env({**env, **out}) == LaunchEnv(5, 8, 1, "gpu008", 12345, "torchrun")  # consistent once exported
    assert torch_env({**env, **out}) == {}


# ----------------------------------------------------------------------------- CUDA generator states


def test_cuda_generator_states_follow_the_device_each_rank_computes_on():
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # 8 GPUs visible, rank 5 on cuda:5
    ckpt = {"cuda": saved, "cuda_device": 5}
    got = cuda_states_to_restore(ckpt, visible=1, current=0)  # Slurm binds one GPU per task
    assert list(got) == [0] and torch.equal(got[0], saved[5])
    got = cuda_states_to_restore(ckpt, visible=8, current=5)  # torchrun again: every index as saved
    assert all(torch.equal(got[i], saved[i]) for i in range(8))
    one = {"cuda": [saved[5]], "cuda_device": 0}  # written under Slurm's binding, resumed under torchrun
    got = cuda_states_to_restore(one, visible=8, current=5)
    assert set(got) == {0, 5} and torch.equal(got[5], saved[5])
    assert cuda_states_to_restore({"cuda": saved}, visible=2, current=1) == {0: saved[0], 1: saved[1]}  # old files
    assert cuda_states_to_restore({}, visible=8, current=0) == {}

    torch.manual_seed(7)  # here, without CUDA, the CUDA part is skipped (never called) and the rest restored
    state = {**rng_state(), **ckpt}
    expected = torch.rand(4)
    torch.manual_seed(8)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), expected)


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], bound_s: float) -> list[tuple[int, str]]:
    """(returncode, stderr) of each process; fails naming the survivors when one outlives ``bound_s``."""
    deadline = time.monotonic() + bound_s
    out = []
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {i} still running after {bound_s} s (a hang, not an error)")
        out.append((p.returncode, err))
    return out


SETUP_FAILS = r"""
import sys
from core.trainer import distributed as D
if sys.argv[1] == "1":
    raise RuntimeError("rank 1: dataset not found on this node")
D.cleanup(D.init_distributed("cpu"))
"""


@pytest.mark.slow  # two interpreters importing torch, then the rendezvous timeout (10 s)
def test_a_rank_that_fails_before_joining_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 dies during setup; rank 0 stops waiting after TCAE_DIST_TIMEOUT_S and says why
    (before: it waited for the 3-hour collective timeout)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SETUP_FAILS, str(r)], cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "TCAE_DIST_TIMEOUT_S": "10"}) for r in range(2)]
    (rc0, err0), (rc1, err1) = _wait_all(procs, bound_s=90)
    assert rc1 != 0 and "dataset not found" in err1
    assert rc0 != 0 and "TCAE_DIST_TIMEOUT_S" in err0 and "did another rank fail to start" in err0, err0[-2000:]


def _srun(run_dir: Path, partition: str) -> subprocess.Popen:
    """``srun -n 2 python -m core.train`` as a user types it (no RANK/WORLD_SIZE in the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["srun", "--label", "--ntasks=2", "--cpus-per-task=1", "--mem=2G", "--time=10", f"--partition={partition}",
           "--kill-on-bad-exit=0", sys.executable, "-m", "core.train", "--run-dir", str(run_dir)]
    for item in TINY_SET:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slurm
@pytest.mark.slow  # two sruns of two tasks each; ~40 s on an idle 2-core machine
def test_srun_trains_data_parallel_and_a_held_run_directory_refuses_every_rank(slurm_cluster, tmp_path):
    from orchestrator.stages import acquire_stage_lock

    run_dir = tmp_path / "tokenizer"
    # 1. The orchestrator's stage lock on the same directory: both tasks refuse, naming the holder,
    #    and nothing is written (before: both trained, each as a world of one).
    lock = acquire_stage_lock(tmp_path, "tokenizer")
    try:
        proc = _srun(run_dir, slurm_cluster)
        _, err = proc.communicate(timeout=300)
    finally:
        os.close(lock)
    assert proc.returncode != 0
    refused = [line for line in err.splitlines() if f"is locked by pid {os.getpid()}" in line]
    assert {line.split(":")[0].strip() for line in refused} == {"0", "1"}, err[-3000:]  # every task says why
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]

    # 2. Unlocked: one world of 2 ranks (each its own rows of the batch), one log record per step.
    proc = _srun(run_dir, slurm_cluster)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((run_dir / "result.json").read_text())["info"]["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow  # one Slurm job of two tasks training 4 steps; ~40 s
def test_a_two_task_submitit_job_runs_the_stage_with_launcher_variables_already_set(slurm_cluster, tmp_path,
                                                                                     tiny_config, monkeypatch):
    """The orchestrator's StageTask in a 2-task Slurm job whose environment already holds
    MASTER_PORT (sbatch passes the submitter's environment on): it runs on 2 ranks and rank 0
    writes the one result (before: submitit's export() raised "MASTER_PORT is already set")."""
    import submitit

    from core.config import config_dict
    from orchestrator.stages import StageTask

    run_root = tmp_path / "run"
    run_root.mkdir()
    cfg = tiny_config(**{"data.batch_size": 4, "train.steps": 4, "train.log_every": 1})
    (run_root / "config.yaml").write_text(json.dumps(config_dict(cfg)))
    (run_root / "run.json").write_text(json.dumps({"run_hash": "h6", "sweep": "launch", "params": {},
                                                   "executor": "slurm", "stages": {"tokenizer": {}}}))
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = submitit.SlurmExecutor(folder=tmp_path / "submitit" / "%j")
    ex.update_parameters(time=10, ntasks_per_node=2, cpus_per_task=1, mem="2G", partition=slurm_cluster)
    job = ex.submit(StageTask("tokenizer", str(run_root)))
    written = job.results()  # one per task; raises with the job's traceback when a task failed
    assert written[0].endswith("tokenizer.attempt1.json") and written[1] == ""
    result = json.loads(Path(written[0]).read_text())
    assert result["status"] == "finished" and result["info"]["world_size"] == 2
    assert sorted(p.name for p in (run_root / "results").iterdir()) == ["tokenizer.attempt1.json"]


def test_the_run_directory_lock_is_the_stage_lock(tiny_config, tmp_path):
    """The orchestrator's rank 0 holds ``{run}/{stage}/.lock``: a second launch on that directory
    is refused naming it (before: it trained alongside), while the holder itself calls the
    core entry point on the directory and goes through."""
    from core.train import train
    from orchestrator.stages import acquire_stage_lock, lock_holder

    run_dir = tmp_path / "tokenizer"
    lock = acquire_stage_lock(tmp_path, "tokenizer")
    try:
        cmd = [sys.executable, "-m", "core.train", "--run-dir", str(run_dir)]
        cmd += [a for item in TINY_SET for a in ("--set", item)]
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and f"is locked by pid {os.getpid()} on " in second.stderr, second.stderr[-2000:]
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
        result = train(tiny_config(**{"train.steps": 2}), run_dir)
        assert result["info"]["steps"] == 2
        assert lock_holder(tmp_path, "tokenizer").startswith(f"pid {os.getpid()} ")  # still the orchestrator's
    finally:
        os.close(lock)
    assert lock_holder(tmp_path, "tokenizer") is None
