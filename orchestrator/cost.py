"""What a sweep costs: an estimate before it is queued, the measured hours after.

Before (``orchestrate submit --dry-run``): each (run, stage) of the plan gets its compute in
FLOPs from the run config alone — the closed forms of :mod:`core.models.flops_formulas`,
torch-free, so a 1,000-run dry run stays fast — and a GPU-hour estimate at a stated FLOP
rate, printed next to what the stage asks Slurm for (GPUs × time limit).

FLOPs = 2 · MACs of matmuls and convolutions; forward + backward = 3 × forward; what each
stage counts (LPIPS, SSL crops, discriminator, sampling, Inception ...) is in :func:`stage_flops`.
Not counted: element-wise ops, norms, optimizer updates, data loading.  GPU time = FLOPs /
(GPUs used × rate); GPU-hours billed = that time × GPUs allocated.  The rate of a stage is,
first found wins (:func:`measured_rates`; the table says which it used):

1. the sweep's own ``cost.mfu`` / ``cost.cpu_gflops_per_core``, when the sweep file sets them;
2. measured on this project's code: the median FLOP/s per device of finished runs of that
   stage and model size in the results database (their counted FLOPs / ``train_time_s``),
   else the ``gpu_smoke`` JSON (``benchmarks/gpu_smoke.py --out``) named by ``cost.measurements``
   or placed at ``benchmarks/gpu_smoke.json`` (the tokenizer's eager step, the DiT step);
3. the defaults of :class:`CostSpec`: peak 989 TFLOP/s (dense BF16 of an NVIDIA H100/H200 SXM,
   datasheet) × MFU 0.35 (a typical ViT/DiT utilisation, not this code's: the first H200
   measurement was 0.125 for the L1 step); CPU stages 20 GFLOP/s per core (measured
   2026-12-01 on the shared 2-vCPU Xeon: the configs/tiny_cpu.yaml tokenizer step).

After: :func:`record_actual` stores ``<stage>_{gpu,cpu}_hours`` metric rows from Slurm accounting
(:func:`orchestrator.slurm.usage`) or, for local stages, wall time × requested cpus.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from core.config import load_config
from core.models.flops_formulas import (INCEPTION_FLOPS, dit_flops, encoder_flops, tokenizer_flops, vgg16_flops,
                                        vit_block)
from core.models.geometry import VIT_SIZES

# plan: orchestrator.plan.Plan, spec: sweep.SweepFile, cfg: core.config.RunConfig (not imported: sweep imports us)

IMAGENET_TRAIN = 1_281_167  # images of the ImageNet-1K train split (ImageFolder size unknown at plan time)
DEFAULT_MFU, DEFAULT_CPU_GFLOPS = 0.35, 20.0  # used when neither set nor measured (module docstring)
GPU_SMOKE_PATH = "benchmarks/gpu_smoke.json"  # where a gpu_smoke result is read without `cost.measurements`


class CostSpec(BaseModel):
    """Sweep-file ``cost:`` block: the FLOP rates the estimate assumes (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    gpu_peak_tflops: float = Field(989.0, gt=0)  # per GPU, dense bf16 (H100/H200 SXM datasheet)
    mfu: float | None = Field(None, gt=0, le=1)  # achieved / peak FLOP/s; set, it wins over measurements
    cpu_gflops_per_core: float | None = Field(None, gt=0)  # CPU-only stages; set, it wins over measurements
    measurements: str | None = None  # a benchmarks/gpu_smoke.py JSON file (default: GPU_SMOKE_PATH if present)


# ----------------------------------------------------------------------------- FLOPs of a stage


def size_of(stage: str, cfg) -> str:
    """The model size a stage's FLOP rate is measured and looked up by."""
    return cfg.generator.size if stage == "generator" else cfg.model.encoder_size


def _ssl_flops(cfg) -> int:
    """Per image: student fwd+bwd on 2 global + local crops, EMA teacher fwd on 2 global, heads."""
    s = cfg.ssl
    if s.method == "none":
        return 0
    enc = VIT_SIZES[cfg.model.encoder_size]
    d, side, p = enc.width, cfg.data.image_size, cfg.model.patch_size
    step = 2 * p if (cfg.model.split_depth is not None and cfg.model.split_depth < enc.depth) else p
    local = s.local_crop_size or max(step, round(side * 3 / 7 / step) * step)
    head = 2 * (d * s.hidden_dim + s.hidden_dim ** 2 + s.hidden_dim * s.bottleneck_dim + s.bottleneck_dim * s.out_dim)
    patch_head = 2 * (d * s.hidden_dim + s.hidden_dim ** 2 + s.hidden_dim * s.bottleneck_dim
                      + s.bottleneck_dim * (s.patch_out_dim or s.out_dim))
    glob = encoder_flops(cfg.model, side, bottleneck=False) + head
    if s.method in ("ibot", "dinov2"):
        glob += (side // step) ** 2 * patch_head
    loc = encoder_flops(cfg.model, local, bottleneck=False) + head
    return 3 * (2 * glob + s.local_crops * loc) + 2 * glob


def _disc_forward(cfg) -> int:
    """One forward of the frozen ViT-S/8 discriminator backbone at ``finetune.disc_image_size``."""
    n = (cfg.finetune.disc_image_size // 8) ** 2 + 1
    return 12 * vit_block(n, 384) + 2 * (n - 1) * 384 * 3 * 64


def _train_images(cfg) -> int:
    return cfg.data.train_size if cfg.data.name == "synthetic" else IMAGENET_TRAIN


def _finetune_flops(cfg, tok: dict[str, int], lpips: int, world: int) -> float:
    """Decoder fine-tuning: images = epochs x train split (or steps x global batch); per image
    encoder fwd + decoder fwd+bwd (+ LPIPS); from the discriminator's start, its D step (real
    + fake forwards of the frozen backbone) and from the adversarial start, the G term's
    forward + backward through the backbone to the image (≈ 2 forwards)."""
    ft = cfg.finetune
    if ft.steps is None and ft.epochs:
        images, start_d, start_g, length = (ft.epochs * _train_images(cfg), ft.disc_start_epoch,
                                            ft.adv_start_epoch, ft.epochs)
    else:
        steps = ft.steps or cfg.train.steps
        images = steps * (ft.batch_size or cfg.data.batch_size * world)
        start_d, start_g, length = ft.disc_start_step, ft.adv_start_step, steps
    frac_d, frac_g = (max(0.0, 1 - start / length) for start in (start_d, start_g))
    per_image = tok["encoder"] + 3 * tok["decoder"] + lpips + _disc_forward(cfg) * (2 * frac_d + 2 * frac_g)
    return float(per_image) * images


def generator_train_flops(cfg) -> float:
    """DiT fwd+bwd × steps × batch: the part of the generator stage its ``generator_train_time_s`` times."""
    g = cfg.generator
    return 3.0 * dit_flops(g.size, cfg.model.latent_size, cfg.model.latent_channels) * g.steps * g.batch_size


def stage_flops(stage: str, cfg, world: int = 1) -> float | None:
    """Total FLOPs of one run's ``stage`` (None: no model of that stage's compute)."""
    side = cfg.data.image_size
    tok = tokenizer_flops(cfg.model, side)
    lpips = 3 * vgg16_flops(side) if cfg.loss.lpips_weights and cfg.loss.perceptual else 0
    inception = INCEPTION_FLOPS if cfg.eval.fid_backbone == "inception" or (
        cfg.eval.fid_backbone == "auto" and cfg.eval.inception_weights) else 0
    if stage == "tokenizer":
        return float(3 * tok["total"] + lpips + _ssl_flops(cfg)) * cfg.train.steps * cfg.data.batch_size * world
    if stage == "finetune":
        return _finetune_flops(cfg, tok, lpips, world)
    if stage == "evaluate":
        e = cfg.eval
        lp = 2 * vgg16_flops(side) if cfg.loss.lpips_weights else 0
        probe = (e.probe_train + e.probe_val) * tok["encoder"]
        return float(e.num_samples * (tok["total"] + 2 * inception + lp) + probe)
    if stage == "generator":
        g = cfg.generator
        if not g.enabled:
            return 0.0
        dit = dit_flops(g.size, cfg.model.latent_size, cfg.model.latent_channels)
        per_sample = g.sample_steps * dit * (2 if g.sampler == "heun" else 1) * (1 if g.cfg_scale == 1.0 else 2)
        evals = len(set(g.eval_at) | {g.steps})
        return float(_train_images(cfg) * tok["encoder"] + generator_train_flops(cfg)
                     + evals * g.num_samples * (per_sample + tok["decoder"] + inception))
    return None


# ----------------------------------------------------------------------------- FLOP rates


@dataclass(frozen=True)
class Rate:
    flops_per_s: float  # per device: one GPU, or one CPU core
    source: str  # where the number comes from, printed with the estimate


def _db_rates(store) -> dict[tuple[str, str, str], list[float]]:
    """FLOP/s per device of each finished tokenizer / generator stage: counted FLOPs / its own timer."""
    from sqlalchemy import select

    from core.config import RunConfig
    from orchestrator.db.models import Metric, Run, Sweep
    from orchestrator.stages import DISTRIBUTED_STAGES  # submitit: not at import (sweep validation imports us)

    timers = {"tokenizer": "train_time_s", "generator": "generator_train_time_s"}
    with store.session() as s:
        rows = s.execute(select(Metric.stage, Metric.name, Metric.value, Run.config, Sweep.spec_yaml)
                         .join(Run, Metric.run_id == Run.id).join(Sweep, Run.sweep_id == Sweep.id)
                         .where(Metric.name.in_(list(timers.values())), Metric.stage.in_(list(timers)))).all()
    specs: dict[str, dict] = {}
    out: dict[tuple[str, str, str], list[float]] = {}
    for stage, name, seconds, config, spec_yaml in rows:
        if name != timers[stage] or not seconds or seconds <= 0 or not spec_yaml:
            continue
        spec = specs.setdefault(spec_yaml, yaml.safe_load(spec_yaml))
        res = spec.get("stages", {}).get(stage, {}).get("resources", {})
        gpus, cpus = res.get("gpus", 0), res.get("cpus", 1)
        world = gpus if gpus and stage in DISTRIBUTED_STAGES else 1
        try:
            cfg = RunConfig.model_validate(config)
        except ValueError:  # a run of an older config schema: left out
            continue
        flops = stage_flops(stage, cfg, world) if stage == "tokenizer" else generator_train_flops(cfg)
        used = world if gpus else cpus
        out.setdefault((stage, size_of(stage, cfg), "gpu" if gpus else "cpu"), []).append(flops / seconds / used)
    return out


SMOKE_ROWS = {"tokenizer": ("tokenizer_joint_loop", "tokenizer_joint", "tokenizer_l1"), "generator": ("generator",)}


def _smoke_rates(path: Path) -> dict[tuple[str, str, str], Rate]:
    """Per stage, counted FLOPs / time of the first :data:`SMOKE_ROWS` row of a GPU gpu_smoke result."""
    doc = json.loads(path.read_text())
    if str(doc.get("device", "cpu")) == "cpu" or doc.get("tiny"):
        return {}  # a CPU run says nothing about a job's GPUs (nor, threaded, about one core)
    rows = {r["stage"]: r for r in doc["stages"] if r.get("flops_per_step") and r.get("step_s")}
    out = {}
    for stage, names in SMOKE_ROWS.items():
        row = next((rows[n] for n in names if n in rows), None)
        if row is not None:  # the tokenizer rows' size: their config's (with the defaults)
            size = row.get("size") or load_config(None, doc.get("joint_config") or {}).model.encoder_size
            out[(stage, size, "gpu")] = Rate(row["flops_per_step"] / row["step_s"],
                                             f"gpu_smoke {path} ({doc['device']}, {row['stage']})")
    return out


def measured_rates(store=None, smoke: str | Path | None = None) -> dict[tuple[str, str, str], Rate]:
    """``(stage, size, "gpu" | "cpu") -> Rate`` measured on this project's code: finished runs in
    ``store`` (median over runs) first, then the ``gpu_smoke`` JSON ``smoke`` (default
    :data:`GPU_SMOKE_PATH` when it exists)."""
    from orchestrator.errors import UsageError

    path = Path(smoke) if smoke else Path(GPU_SMOKE_PATH)
    try:
        out = _smoke_rates(path) if smoke or path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"key 'cost.measurements': {path} is not a benchmarks/gpu_smoke.py result: {e!r}") from None
    for key, rates in (_db_rates(store) if store is not None else {}).items():
        out[key] = Rate(statistics.median(rates), f"median of {len(rates)} finished run(s) in the database")
    return out


def stage_rate(stage: str, cfg, gpus: int, cs: CostSpec, measured: dict) -> Rate:
    """FLOP/s per device the estimate uses for one run's stage (precedence: module docstring)."""
    kind = "gpu" if gpus else "cpu"
    if kind == "gpu" and cs.mfu is not None:
        return Rate(cs.gpu_peak_tflops * 1e12 * cs.mfu, "sweep key cost.mfu")
    if kind == "cpu" and cs.cpu_gflops_per_core is not None:
        return Rate(cs.cpu_gflops_per_core * 1e9, "sweep key cost.cpu_gflops_per_core")
    hit = measured.get((stage, size_of(stage, cfg), kind))
    if hit is not None:
        return hit
    return Rate(cs.gpu_peak_tflops * 1e12 * DEFAULT_MFU if gpus else DEFAULT_CPU_GFLOPS * 1e9, "assumed (default)")


# ----------------------------------------------------------------------------- the plan's estimate


@dataclass
class StageCost:
    stage: str
    runs: int = 0
    flops: float = 0.0
    est_hours: float = 0.0  # estimated GPU-hours billed (GPU stages) or core-hours (CPU stages)
    wall_h_max: float = 0.0  # longest estimated wall time of one run's stage
    requested_hours: float = 0.0  # GPUs (or cpus) × time limit, summed over runs
    time_limit_h: float = 0.0
    gpus: int = 0
    unknown: int = 0  # runs of a stage without a compute model (selftest, echo, ...)
    notes: list[str] = field(default_factory=list)
    rates: dict[Rate, int] = field(default_factory=dict)  # FLOP rate used -> runs priced at it

    @property
    def unit(self) -> str:
        return "GPU-h" if self.gpus else "core-h"

    def rate_text(self, peak_tflops: float) -> str:  # "MFU 0.125 gpu_smoke ..." / "20 GFLOP/s/core ..."
        return "; ".join((f"MFU {r.flops_per_s / (peak_tflops * 1e12):.3g}" if self.gpus
                          else f"{r.flops_per_s / 1e9:.3g} GFLOP/s/core") + f" {r.source}"
                         + (f" [{n} runs]" if len(self.rates) > 1 else "") for r, n in self.rates.items())


def estimate(plan, spec, store=None) -> list[StageCost]:
    """Per-stage cost of every (run, stage) in ``plan`` (an ``orchestrator.plan.Plan`` of the
    sweep file ``spec``); ``store``: a results database whose finished runs give measured rates."""
    from orchestrator.stages import DISTRIBUTED_STAGES

    cs: CostSpec = getattr(spec, "cost", None) or CostSpec()
    measured = measured_rates(store, cs.measurements)
    out: dict[str, StageCost] = {}
    for h, stages in plan.todo.items():
        cfg = plan.runs[h].config
        for stage in stages:
            res = spec.stages[stage].resources
            sc = out.setdefault(stage, StageCost(stage, gpus=res.gpus, time_limit_h=res.time_min / 60))
            sc.runs += 1
            used = (res.gpus if stage in DISTRIBUTED_STAGES else 1) if res.gpus else res.cpus
            sc.requested_hours += (res.gpus or res.cpus) * res.time_min / 60
            flops = stage_flops(stage, cfg, world=res.gpus if res.gpus and stage in DISTRIBUTED_STAGES else 1)
            if flops is None:
                sc.unknown += 1
                continue
            rate = stage_rate(stage, cfg, res.gpus, cs, measured)
            sc.rates[rate] = sc.rates.get(rate, 0) + 1
            wall_h = flops / (used * rate.flops_per_s) / 3600
            sc.flops += flops
            sc.est_hours += wall_h * (res.gpus or res.cpus)
            sc.wall_h_max = max(sc.wall_h_max, wall_h)
    for sc in out.values():
        res = spec.stages[sc.stage].resources
        if res.gpus > 1 and sc.stage not in DISTRIBUTED_STAGES:
            sc.notes.append(f"runs one process: {res.gpus - 1} of {res.gpus} GPUs idle")
        if sc.wall_h_max > sc.time_limit_h:
            sc.notes.append(f"longest run ~{sc.wall_h_max:.1f} h > time limit {sc.time_limit_h:.1f} h "
                            f"(requeues from checkpoints)")
        if sc.unknown:
            sc.notes.append(f"{sc.unknown} run(s) without a compute model")
    return list(out.values())


def describe(costs: list[StageCost], spec) -> str:
    """The estimate as a table for ``--dry-run``."""
    from tabulate import tabulate

    cs: CostSpec = getattr(spec, "cost", None) or CostSpec()
    rows = [[c.stage, c.runs, f"{c.flops / max(c.runs - c.unknown, 1) / 1e15:.4g}", f"{c.flops / 1e15:.4g}",
             f"{c.wall_h_max:.3g}", f"{c.est_hours:.4g} {c.unit}",
             f"{c.requested_hours:.4g} {c.unit} ({c.gpus or spec.stages[c.stage].resources.cpus}"
             f" x {c.time_limit_h:.3g} h x {c.runs})", c.rate_text(cs.gpu_peak_tflops), "; ".join(c.notes)]
            for c in costs]
    gpu = sum(c.est_hours for c in costs if c.gpus)
    cpu = sum(c.est_hours for c in costs if not c.gpus)
    req_gpu = sum(c.requested_hours for c in costs if c.gpus)
    head = (f"cost estimate (FLOPs = 2·MACs, fwd+bwd = 3x fwd; rate per stage: the sweep's `cost:` key, else "
            f"measured, else {DEFAULT_MFU:g} MFU of {cs.gpu_peak_tflops:g} TFLOP/s per GPU [dense bf16, NVIDIA "
            f"H100/H200 SXM datasheet] and {DEFAULT_CPU_GFLOPS:g} GFLOP/s per CPU core):")
    table = tabulate(rows, headers=["stage", "runs", "PFLOP/run", "PFLOP total", "longest run (wall h)",
                                    "estimated", "requested (units x limit x runs)", "FLOP rate used", "notes"],
                     tablefmt="simple")
    parts = ([f"{gpu:.4g} GPU-h (requested {req_gpu:.4g} GPU-h)"] if any(c.gpus for c in costs) else []) + (
        [f"{cpu:.4g} CPU core-h"] if any(not c.gpus for c in costs) else [])
    total = f"sweep total: {sum(c.flops for c in costs) / 1e15:.4g} PFLOP, estimated " + " + ".join(parts)
    return "\n".join([head, table, total])


def to_dict(costs: list[StageCost], peak_tflops: float = CostSpec().gpu_peak_tflops) -> list[dict[str, Any]]:
    return [{"stage": c.stage, "runs": c.runs, "pflops": c.flops / 1e15, "estimated_hours": c.est_hours,
             "unit": c.unit, "requested_hours": c.requested_hours, "wall_h_max": c.wall_h_max, "notes": c.notes,
             "rates": [{"source": r.source, "flops_per_s": r.flops_per_s, "runs": n,
                        **({"mfu": r.flops_per_s / (peak_tflops * 1e12)} if c.gpus else {})}
                       for r, n in c.rates.items()]}
            for c in costs]


# ----------------------------------------------------------------------------- actual cost, after


FINAL = ("finished", "failed", "cancelled")
MEASURED = ("sacct", "wallclock")  # backbones of the rows written here


def record_actual(store, sweep: str) -> int:
    """Store the measured cost of every ended stage of ``sweep`` not recorded yet.

    Slurm stages: ``<stage>_gpu_hours`` = ElapsedRaw × allocated GPUs / 3600, or
    ``<stage>_cpu_hours`` = ElapsedRaw × allocated CPUs when the job had no GPU (backbone
    ``sacct``).  Local/debug stages: ``<stage>_cpu_hours`` = recorded wall time × the stage's
    requested cpus (backbone ``wallclock``).  One metric row per (run, stage), attached to the
    stage's loaded attempt (a newer attempt's ingest replaces it; it is measured again).
    Returns the number of rows written.
    """
    from sqlalchemy import delete, select

    from orchestrator import slurm
    from orchestrator.db.models import Metric, Run, RunStage, Sweep

    with store.session() as s:
        rows = s.execute(select(Run.id, Run.executor, RunStage.stage, RunStage.slurm_job_id, RunStage.started_at,
                                RunStage.ended_at, RunStage.result_attempt, RunStage.attempt)
                         .join(RunStage, RunStage.run_id == Run.id).join(Sweep, Run.sweep_id == Sweep.id)
                         .where(Sweep.name == sweep, RunStage.status.in_(FINAL))).all()
        have = {(m.run_id, m.stage): m.attempt for m in s.execute(
            select(Metric.run_id, Metric.stage, Metric.attempt).where(
                Metric.run_id.in_(sorted({r.id for r in rows})), Metric.backbone.in_(MEASURED)))} if rows else {}
        spec_yaml = s.scalars(select(Sweep.spec_yaml).where(Sweep.name == sweep)).one_or_none()
    # measured once per attempt: a retried stage's new attempt replaces its predecessor's row
    todo = [r for r in rows if have.get((r.id, r.stage)) != (r.attempt or r.result_attempt or 1)]
    if not todo:
        return 0
    slurm_ids = [r.slurm_job_id for r in todo if r.slurm_job_id]
    usage = slurm.usage(slurm_ids) if slurm_ids and slurm.available() else {}
    stages = (yaml.safe_load(spec_yaml) or {}).get("stages", {}) if spec_yaml else {}  # stored at submission
    new = []
    for r in todo:
        attempt = r.attempt or r.result_attempt or 1  # the latest attempt (its job id, its times)
        if r.slurm_job_id:
            u = usage.get(r.slurm_job_id)
            if u is None:
                continue  # accounting not there (yet)
            kind, n = ("gpu", u["gpus"]) if u["gpus"] else ("cpu", u["cpus"])
            value, backbone, source = u["elapsed_s"] * n / 3600, "sacct", f"sacct:{r.slurm_job_id}"
        elif r.executor in ("local", "debug") and r.started_at and r.ended_at and r.result_attempt == attempt:
            kind, backbone, source = "cpu", "wallclock", "wallclock"
            cpus = stages.get(r.stage, {}).get("resources", {}).get("cpus", 1)
            value = (r.ended_at - r.started_at).total_seconds() * cpus / 3600
        else:
            continue
        new.append(Metric(run_id=r.id, stage=r.stage, name=f"{r.stage}_{kind}_hours", value=value, step=None,
                          backbone=backbone, num_samples=None, attempt=attempt, source_file=source))
    if new:
        with store.session() as s:
            for m in new:
                if (m.run_id, m.stage) in have:  # an earlier attempt's row
                    s.execute(delete(Metric).where(Metric.run_id == m.run_id, Metric.stage == m.stage,
                                                   Metric.backbone.in_(MEASURED)))
            s.add_all(new)
    return len(new)
