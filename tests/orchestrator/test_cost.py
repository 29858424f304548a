"""Cost of a sweep: the closed-form FLOPs agree with the FLOP counter; --dry-run prints the
estimate beside the Slurm request; measured hours come from real Slurm accounting."""
from __future__ import annotations

import json
import subprocess
import time

import pandas as pd
import pytest
import torch
import yaml

from core.config import load_config
from core.eval.flops import count_flops
from core.eval.flops import tokenizer_flops as counted_tokenizer_flops
from core.models import flops_formulas
from orchestrator import cost, slurm
from orchestrator.cli import main
from orchestrator.db.store import Store
from orchestrator.plan import build_plan
from orchestrator.ingest import ingest
from orchestrator.query import runs_table
from orchestrator.results import write_result_file
from orchestrator.sweep import load_sweep
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture)

GEOMETRIES = [  # patch, split depth, compression, encoder, decoder, class token, latent side
    (4, None, "conv", "micro", "micro", False, 4),
    (4, 2, "conv", "micro", "mini", False, 4),
    (8, 2, "shuffle_mlp", "micro", "micro", True, 2),
    (4, 0, "conv", "micro", "mini", True, 8),
    (2, 3, "shuffle_mlp", "mini", "mini", False, 4),
]


@pytest.mark.parametrize("patch,k,comp,enc,dec,cls,lat", GEOMETRIES)
def test_closed_form_tokenizer_flops_equal_the_counter(patch, k, comp, enc, dec, cls, lat):
    from core.models.tokenizer import build_tokenizer, tokenizer_args

    cfg = load_config(None, {"data.image_size": 32, "model.patch_size": patch, "model.split_depth": k,
                             "model.compression": comp, "model.encoder_size": enc, "model.decoder_size": dec,
                             "model.class_token": cls, "model.latent_size": lat})
    with torch.device("meta"):  # shapes only: counting needs no weights
        model = build_tokenizer(tokenizer_args(cfg.model, 32))
    assert flops_formulas.tokenizer_flops(cfg.model, 32) == counted_tokenizer_flops(model, 32)


def test_closed_form_paper_scale_s16_and_dit_equal_the_counter():
    from core.models.dit import DiT
    from core.models.tokenizer import build_tokenizer, tokenizer_args

    cfg = load_config("configs/s16_joint.yaml", {"generator.size": "B"})
    with torch.device("meta"):
        model = build_tokenizer(tokenizer_args(cfg.model, 256))
        dit = DiT("B", cfg.model.latent_channels, cfg.model.latent_size, num_classes=1000)
    assert flops_formulas.tokenizer_flops(cfg.model, 256) == counted_tokenizer_flops(model, 256)
    c, h = cfg.model.latent_channels, cfg.model.latent_size
    x = torch.zeros(1, c, h, h, device="meta")
    n = count_flops(dit, x, torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    assert flops_formulas.dit_flops("B", h, c) == n


def test_vgg16_closed_form_equals_the_counter():
    import torchvision

    with torch.device("meta"):
        vgg = torchvision.models.vgg16().features[:30]  # through conv5_3 + ReLU: the LPIPS taps
    assert flops_formulas.vgg16_flops(224) == count_flops(vgg, torch.zeros(1, 3, 224, 224, device="meta"))


def test_dry_run_prints_estimate_beside_the_slurm_request(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'never.db'}"
    capsys.readouterr()
    assert main(["submit", "sweeps/token_scaling.yaml", "--dry-run", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "cost estimate" in out and "989 TFLOP/s" in out and "0.35 MFU" in out
    assert "sweep total:" in out and "GPU-h" in out
    assert "GPUs idle" not in out  # every multi-GPU stage (the generator too) runs one rank per GPU
    assert not (tmp_path / "never.db").exists()

    assert main(["submit", "sweeps/token_scaling.yaml", "--dry-run", "--json", "--db", url]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["cost"]}
    assert set(rows) == {"tokenizer", "finetune", "evaluate", "generator"} and rows["tokenizer"]["runs"] == 120
    # the tokenizer row = sum over runs of 3 x fwd FLOPs x steps x global batch (+ SSL), at 0.35 x 989 TFLOP/s
    sweep = load_sweep("sweeps/token_scaling.yaml")
    total = sum(cost.stage_flops("tokenizer", r.config, world=8) for r in sweep.runs)
    assert rows["tokenizer"]["pflops"] == pytest.approx(total / 1e15)
    assert rows["tokenizer"]["estimated_hours"] == pytest.approx(total / (8 * 989e12 * 0.35) / 3600 * 8)
    assert rows["tokenizer"]["requested_hours"] == pytest.approx(120 * 8 * 2880 / 60)
    vanilla = next(r for r in sweep.runs if r.params == {"model.patch_size": 16, "model.decoder_size": "S",
                                                         "model.split_depth": 12, "ssl.method": "none"})
    fwd = flops_formulas.tokenizer_flops(vanilla.config.model, 256)["total"]
    assert cost.stage_flops("tokenizer", vanilla.config, world=8) == 3 * fwd * 125150 * 64 * 8


def test_estimate_of_1000_runs_is_fast(tmp_path):
    doc = {"name": "big", "base": {"data": {"image_size": 32}},
           "axes": {"train.seed": list(range(500)), "model.patch_size": [8, 4]},
           "stages": {"tokenizer": {"resources": {"gpus": 1}}, "evaluate": {"needs": ["tokenizer"]}},
           "executor": "slurm", "runs_dir": str(tmp_path)}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(doc))
    sweep = load_sweep(tmp_path / "big.yaml")
    plan = build_plan(sweep, {r.run_hash: ["tokenizer", "evaluate"] for r in sweep.runs}, sweep.runs, 10**6)
    t0 = time.perf_counter()
    costs = cost.estimate(plan, sweep.spec)
    text = cost.describe(costs, sweep.spec)
    assert time.perf_counter() - t0 < 0.5
    assert [c.runs for c in costs] == [1000, 1000] and "core-h" in text  # evaluate: a CPU stage


def test_parse_tres():
    assert slurm.parse_tres("billing=8,cpu=64,gres/gpu=8,gres/gpu:h100=8,mem=480G,node=1") == {
        "billing": 8, "cpu": 64, "gpu": 8, "mem": 480, "node": 1}
    assert slurm.parse_tres("cpu=2,mem=1G,node=1").get("gpu") is None
    assert slurm.parse_tres("") == {}


def _selftest_sweep(tmp_path, executor, partition=None):
    res = {"cpus": 1, "mem_gb": 0.25, "time_min": 10, **({"partition": partition} if partition else {})}
    doc = {"name": "cost", "base": {"data": {"image_size": 32}, "train": {"steps": 4, "ckpt_every": 2}},
           "axes": {"model.patch_size": [8, 4]},
           "stages": {"selftest": {"params": {"step_s": 0.5}, "resources": res}},
           "executor": executor, "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "cost.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slurm
def test_actual_hours_from_real_slurm_accounting(slurm_cluster, tmp_path):  # noqa: F811
    path = _selftest_sweep(tmp_path, "slurm", slurm_cluster)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url, "--wait"]) == 0
    store = Store(url)
    # submit --wait records them when the stages end (sacct may lag: then the next refresh does)
    deadline = time.monotonic() + 60
    while runs_table(store, sweep="cost").get("selftest_cpu_hours_backbone", pd.Series([None])).isna().any():
        assert time.monotonic() < deadline, "sacct never reported the jobs' usage"
        cost.record_actual(store, "cost")  # a job slurmdbd has not stored yet is recorded on a later call
        time.sleep(1)
    assert cost.record_actual(store, "cost") == 0  # recorded once
    table = runs_table(store, sweep="cost")
    assert set(table["selftest_cpu_hours_backbone"]) == {"sacct"}
    jobs = {r.run_hash: r.stages[0].slurm_job_id for r in store.runs(sweep="cost")}
    # independent reading of the accounting: elapsed seconds x allocated CPUs
    for h, job in jobs.items():
        line = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,ElapsedRaw,AllocCPUS", "-j", job.split("_")[0]],
                              capture_output=True, text=True, check=True).stdout
        fields = next(x.split("|") for x in line.splitlines() if x.split("|")[0] == job)
        value = table.set_index("run_hash").loc[h, "selftest_cpu_hours"]
        assert value == pytest.approx(int(fields[1]) * int(fields[2]) / 3600)
        assert int(fields[1]) >= 2  # 4 steps x 0.5 s
    store.dispose()


def test_actual_hours_of_local_stages_from_wall_time(tmp_path):
    path = _selftest_sweep(tmp_path, "debug")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url]) == 0  # blocks: records the hours at the end
    store = Store(url)
    assert cost.record_actual(store, "cost") == 0
    table = runs_table(store, sweep="cost")
    assert set(table["selftest_cpu_hours_backbone"]) == {"wallclock"}
    assert (table["selftest_cpu_hours"] * 3600 >= 2 * 0.9).all()  # >= 4 steps x 0.5 s, 1 cpu
    store.dispose()


def test_sweep_cost_key_sets_the_utilisation_and_is_validated(tmp_path, capsys):
    doc = yaml.safe_load(open("sweeps/token_scaling.yaml"))
    doc.update(runs_dir=str(tmp_path), cost={"mfu": 0.5, "gpu_peak_tflops": 1979.0})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'never.db'}"
    capsys.readouterr()
    assert main(["submit", str(tmp_path / "s.yaml"), "--dry-run", "--json", "--db", url]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["cost"]}
    assert rows["tokenizer"]["estimated_hours"] == pytest.approx(rows["tokenizer"]["pflops"] * 1e15
                                                                 / (1979e12 * 0.5) / 3600)
    doc["cost"] = {"mfuu": 0.5}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["submit", str(tmp_path / "s.yaml"), "--dry-run", "--db", url]) == 2
    err = capsys.readouterr().err
    assert "cost.mfuu" in err and str(tmp_path / "s.yaml") in err


def test_a_retried_stage_is_measured_again(tmp_path):
    path = _selftest_sweep(tmp_path, "debug")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url]) == 0
    store = Store(url)
    h = store.runs(sweep="cost")[0].run_hash
    assert [(m.name, m.attempt) for m in _metrics(store, h) if m.backbone == "wallclock"] == [
        ("selftest_cpu_hours", 1)]
    # a second attempt runs (as a retry would) and its result file is ingested: measured again, once
    payload = json.loads(next((tmp_path / "runs" / "cost" / h / "results").glob("selftest.attempt1.json"))
                         .read_text())
    payload.update(attempt=2, started_at="2026-01-01T00:00:00+00:00", ended_at="2026-01-01T00:30:00+00:00")
    write_result_file(tmp_path / "runs" / "cost" / h, "selftest", 2, payload)
    ingest(store, [tmp_path / "runs"])
    assert cost.record_actual(store, "cost") == 1
    rows = [(m.name, m.attempt, round(m.value, 6)) for m in _metrics(store, h) if m.backbone == "wallclock"]
    assert rows == [("selftest_cpu_hours", 2, 0.5)]  # 30 min x 1 cpu, the earlier attempt's row replaced
    assert cost.record_actual(store, "cost") == 0
    store.dispose()


def _metrics(store, h):
    from sqlalchemy import select

    from orchestrator.db.models import Metric, Run

    with store.session() as s:
        return list(s.scalars(select(Metric).join(Run, Metric.run_id == Run.id).where(Run.run_hash == h)))


def _tokenizer_sweep(tmp_path, name, steps, axes=None, gpus=0):
    doc = {"name": name, "base": {"data": {"name": "synthetic", "image_size": 32, "train_size": 256, "batch_size": 8},
                                  "model": {"encoder_size": "micro", "latent_size": 4, "latent_channels": 8},
                                  "loss": {"perceptual": 0.0}, "train": {"steps": steps, "device": "cpu",
                                                                         "ckpt_every": steps, "log_every": steps}},
           "axes": axes or {"model.patch_size": [8]},
           "stages": {"tokenizer": {"resources": {"cpus": 1, "gpus": gpus, "mem_gb": 1, "time_min": 30}}},
           "executor": "debug", "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dry_run_uses_the_flop_rate_measured_by_finished_runs(tmp_path, capsys):
    # a real (tiny) tokenizer run on this CPU records its counted FLOPs and train_time_s
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(_tokenizer_sweep(tmp_path, "measured", 6)), "--db", url]) == 0
    table = runs_table(Store(url), sweep="measured")
    seconds = float(table["train_time_s"].iloc[0])
    cfg = load_sweep(_tokenizer_sweep(tmp_path, "measured", 6)).runs[0].config
    rate = cost.stage_flops("tokenizer", cfg) / seconds  # FLOP/s per core (1 cpu)

    # a new sweep of the same stage and size is priced at that rate, and says so
    plan_path = _tokenizer_sweep(tmp_path, "next", 600, axes={"model.patch_size": [8, 4]})
    capsys.readouterr()
    assert main(["submit", str(plan_path), "--dry-run", "--json", "--db", url]) == 0
    (row,) = json.loads(capsys.readouterr().out)["cost"]
    (used,) = row["rates"]
    assert used["flops_per_s"] == pytest.approx(rate) and "median of 1 finished run" in used["source"]
    assert row["estimated_hours"] == pytest.approx(row["pflops"] * 1e15 / rate / 3600)
    assert main(["submit", str(plan_path), "--dry-run", "--db", url]) == 0
    assert f"{rate / 1e9:.3g} GFLOP/s/core median of 1 finished run" in capsys.readouterr().out
    # without the database: the stated default, named as such
    assert main(["submit", str(plan_path), "--dry-run", "--json", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["cost"]
    assert row["rates"] == [{"source": "assumed (default)", "flops_per_s": 20e9, "runs": 2}]


def test_dry_run_uses_a_gpu_smoke_measurement_and_the_sweep_key_wins(tmp_path, capsys):
    # the layout benchmarks/gpu_smoke.py writes (its rows: stage, step_s, flops_per_step, ...);
    # step times of the first H200 run (issue 20): L1 step 0.0515 s, the real joint loop 0.495 s
    row = lambda stage, s, flops, **kw: {"stage": stage, "step_s": s, "flops_per_step": flops, "batch": 64, **kw}  # noqa: E731
    smoke = {"device": "NVIDIA H200", "tiny": False, "matmul": {"tflops": 738.0},
             "tokenizer_config": {"model.encoder_size": "S", "model.patch_size": 16, "data.image_size": 256},
             "joint_config": {"model.encoder_size": "S", "ssl.method": "ibot"},
             "stages": [row("tokenizer_l1", 0.0515, 4.75e12), row("tokenizer_joint", 0.218, 3.2e13),
                        row("tokenizer_joint_loop", 0.495, 3.2e13),
                        row("generator", 0.05, 2.4e13, size="XL"), row("generator_sampling_bf16", 0.3, None)]}
    (tmp_path / "smoke.json").write_text(json.dumps(smoke))
    doc = yaml.safe_load(open("sweeps/token_scaling.yaml"))
    doc.update(runs_dir=str(tmp_path), cost={"measurements": str(tmp_path / "smoke.json")})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'never.db'}"
    capsys.readouterr()
    assert main(["submit", str(tmp_path / "s.yaml"), "--dry-run", "--json", "--db", url]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["cost"]}
    (tok,) = rows["tokenizer"]["rates"]  # the real loop, not the bare step
    assert tok["flops_per_s"] == pytest.approx(3.2e13 / 0.495) and tok["mfu"] == pytest.approx(3.2e13 / 0.495 / 989e12)
    assert str(tmp_path / "smoke.json") in tok["source"] and "tokenizer_joint_loop" in tok["source"]
    assert rows["tokenizer"]["estimated_hours"] == pytest.approx(rows["tokenizer"]["pflops"] * 1e15 / (3.2e13 / 0.495)
                                                                 / 3600)
    (gen,) = rows["generator"]["rates"]
    assert gen["flops_per_s"] == pytest.approx(2.4e13 / 0.05) and "generator)" in gen["source"]
    assert {r["source"] for r in rows["finetune"]["rates"]} == {"assumed (default)"}  # not measured
    assert not (tmp_path / "never.db").exists()
    # an explicit cost.mfu is the user's decision: it wins over the measurement
    doc["cost"]["mfu"] = 0.2
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["submit", str(tmp_path / "s.yaml"), "--dry-run", "--json", "--db", url]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["cost"]}
    assert [(r["source"], r["mfu"]) for r in rows["tokenizer"]["rates"]] == [("sweep key cost.mfu", pytest.approx(0.2))]
    # a measurement file that is not there: exit 2 naming the key and the file
    doc["cost"] = {"measurements": str(tmp_path / "absent.json")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["submit", str(tmp_path / "s.yaml"), "--dry-run", "--db", url]) == 2
    err = capsys.readouterr().err
    assert "cost.measurements" in err and "absent.json" in err and "Traceback" not in err
