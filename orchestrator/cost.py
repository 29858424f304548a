"""What a sweep costs: a closed-form estimate before it is queued, Slurm accounting after.

Before (``orchestrate submit --dry-run``): each (run, stage) of the plan gets its compute
in FLOPs from the run config alone — torch-free and closed-form, so a 1,000-run dry run
stays fast — and a GPU-hour estimate at a stated utilisation, printed next to what the
stage asks Slurm for (GPUs × time limit).

Conventions: FLOPs = 2 · MACs of matmuls and convolutions (``core.eval.flops``; a test
checks :func:`tokenizer_flops` against its counter exactly); forward + backward = 3 ×
forward.  Counted per stage:

* ``tokenizer`` / ``finetune``: tokenizer fwd+bwd × steps × global batch (per-process batch
  × GPUs; these stages run one rank per GPU), plus the LPIPS VGG16 (when ``loss.lpips_weights``
  is set; the substitute network is not counted), the SSL multi-crop student/teacher passes
  and heads, and (finetune: epochs × train split, or steps × global batch) the encoder
  forward and the frozen discriminator backbone (its D step and the generator's adversarial
  term, from their start epochs);
* ``evaluate``: reconstructions, Inception features of real and reconstructed images
  (``fid_backbone: inception``), LPIPS, probe features;
* ``generator``: encoding the train split, DiT fwd+bwd × steps × batch, sampling (steps ×
  Heun/CFG factors) + decoding + Inception at every evaluated step.

Not counted: element-wise ops, norms, optimizer updates, data loading.  GPU time =
FLOPs / (GPUs used × peak × MFU); GPU-hours billed = that time × GPUs allocated (a
single-process stage on 8 GPUs uses one).  Defaults (:class:`CostSpec`, sweep key ``cost``):
peak 989 TFLOP/s = dense BF16 tensor-core peak of an NVIDIA H100 SXM (H200: same compute),
from NVIDIA's H100 datasheet; MFU 0.35, a typical measured utilisation of ViT/DiT training
in bf16 (not measured on this project's code: no GPU was available — pass your own);
CPU stages at 20 GFLOP/s per core (fp32; measured 2026-12-01 on the shared 2-vCPU Xeon at load
≈ 6: the configs/tiny_cpu.yaml tokenizer step, batch 32, one thread, counted FLOPs / train time
= 22.5 GFLOP/s at patch 4 and 27 GFLOP/s at patch 2).

After: :func:`record_actual` reads Slurm accounting (one ``sacct`` call: ElapsedRaw ×
AllocTRES gres/gpu, or × cpu without GPUs) and stores ``<stage>_gpu_hours`` /
``<stage>_cpu_hours`` metric rows (backbone ``sacct``); local-executor stages get
``<stage>_cpu_hours`` from their recorded wall time × requested cpus (backbone ``wallclock``).
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # no import cycle with orchestrator.sweep (which imports CostSpec)
    from core.config import RunConfig
    from orchestrator.plan import Plan
    from orchestrator.sweep import SweepFile


class CostSpec(BaseModel):
    """Sweep-file ``cost:`` block: the utilisation the estimate assumes."""

    model_config = ConfigDict(extra="forbid")
    gpu_peak_tflops: float = Field(989.0, gt=0)  # per GPU, dense bf16 (H100/H200 SXM datasheet)
    mfu: float = Field(0.35, gt=0, le=1)  # achieved / peak FLOP/s
    cpu_gflops_per_core: float = Field(20.0, gt=0)  # CPU-only stages (measured, see the module docstring)


IMAGENET_TRAIN = 1_281_167  # images of the ImageNet-1K train split (ImageFolder size unknown at plan time)
INCEPTION_FLOPS = 11.43e9  # Inception-v3 at 299 px (torchvision inception_v3 through core.eval.flops)
VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]  # LPIPS taps


def _sizes():
    """(VIT_SIZES, DIT_SIZES) from the torch-free registry when it exists."""
    try:
        from core.models.geometry import DIT_SIZES, VIT_SIZES  # torch-free (validation path)
    except ImportError:
        from core.models.dit import DIT_SIZES
        from core.models.tokenizer import VIT_SIZES
    return VIT_SIZES, DIT_SIZES


# ----------------------------------------------------------------------------- FLOPs of one image


def _block(n: int, d: int, mlp: int = 4) -> int:
    """ViT block on n tokens of width d: qkv 6nd², attention 4n²d, proj 2nd², MLP 4·mlp·nd²."""
    return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * mlp * d * 2


def _mlp(positions: int, i: int, h: int, o: int) -> int:
    return 2 * positions * (i * h + h * o)


def decoder_split(k: int, enc_depth: int, dec_depth: int) -> int:
    """= core.models.tokenizer.decoder_split (round(k·D_d/D_e), halves up)."""
    return (2 * k * dec_depth + enc_depth) // (2 * enc_depth)


def encoder_token_flops(cfg: "RunConfig", side: int, bottleneck: bool = True) -> int:
    """Encoder FLOPs for one ``side``×``side`` image (an SSL crop: tokens only, no bottleneck)."""
    m = cfg.model
    vit, _ = _sizes()
    size = vit[m.encoder_size]
    d, p, depth = size.width, m.patch_size, size.depth
    k = depth if m.split_depth is None else m.split_depth
    t, cls = side // p, int(m.class_token)
    flops = 2 * t * t * d * 3 * p * p  # patch embedding
    flops += k * _block(t * t + cls, d)
    low = t // 2 if k < depth else t
    if k < depth:  # staged compression to the T/2 grid
        flops += (2 * 2 * low * low * d * d * 9 if m.compression == "conv"
                  else _mlp(low * low, 4 * d, d, d))
    flops += (depth - k) * _block(low * low + cls, d)
    if bottleneck:
        h, c = m.latent_size, m.latent_channels
        flops += _mlp(h * h, d * (low // h) ** 2, d, c) if low >= h else _mlp(low * low, d, d, c * (h // low) ** 2)
    return flops


def tokenizer_flops(cfg: "RunConfig") -> dict[str, int]:
    """Closed-form FLOPs of one image through the tokenizer: ``{encoder, decoder, total}``
    (= ``core.eval.flops.tokenizer_flops`` of the built model)."""
    m, side = cfg.model, cfg.data.image_size
    vit, _ = _sizes()
    enc, size = vit[m.encoder_size], vit[m.decoder_size]
    d, p, h, c = size.width, m.patch_size, m.latent_size, m.latent_channels
    k = enc.depth if m.split_depth is None else m.split_depth
    k_dec = decoder_split(k, enc.depth, size.depth)
    t = side // p
    low = t // 2 if k < enc.depth else t
    dec = _mlp(h * h, c, d, d * (low // h) ** 2) if low >= h else _mlp(low * low, c * (h // low) ** 2, d, d)
    dec += (size.depth - k_dec) * _block(low * low, d)
    if k < enc.depth:  # decompression: conv3x3 on T'² + 2×2 transposed conv from T'² inputs
        dec += (2 * low * low * d * d * 9 + 2 * low * low * d * d * 4 if m.compression == "conv"
                else _mlp(low * low, d, d, 4 * d))
    dec += k_dec * _block(t * t, d)
    dec += 2 * t * t * d * 3 * p * p  # pixel projection
    encoder = encoder_token_flops(cfg, side)
    return {"encoder": encoder, "decoder": dec, "total": encoder + dec}


def vgg16_flops(side: int) -> int:
    """LPIPS VGG16 conv taps (through conv5_3) on one side×side image."""
    flops, s = 0, side
    for layer in VGG16_CONVS:
        if layer == "M":
            s //= 2
            continue
        flops += 2 * s * s * layer[0] * layer[1] * 9
    return flops


def dit_flops(cfg: "RunConfig") -> int:
    """One DiT forward on one latent (patch 1, N = h² tokens; SwiGLU hidden = 8d/3)."""
    _, dit = _sizes()
    size = dit[cfg.generator.size]
    d, n, c = size.width, cfg.model.latent_size ** 2, cfg.model.latent_channels
    hidden = int(2 * d * 4.0 / 3)
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * 2 * hidden + 2 * n * hidden * d
    block += 2 * d * 6 * d  # adaLN modulation (one vector per image)
    return (2 * n * c * d + 2 * (256 * d + d * d) + size.depth * block
            + 2 * d * 2 * d + 2 * n * d * c)


def _ssl_flops(cfg: "RunConfig") -> int:
    """Per image: student fwd+bwd on 2 global + local crops, EMA teacher fwd on 2 global, heads."""
    s = cfg.ssl
    if s.method == "none":
        return 0
    vit, _ = _sizes()
    d, side, p = vit[cfg.model.encoder_size].width, cfg.data.image_size, cfg.model.patch_size
    step = 2 * p if (cfg.model.split_depth is not None and cfg.model.split_depth < vit[cfg.model.encoder_size].depth) else p
    local = s.local_crop_size or max(step, round(side * 3 / 7 / step) * step)
    head = 2 * (d * s.hidden_dim + s.hidden_dim ** 2 + s.hidden_dim * s.bottleneck_dim + s.bottleneck_dim * s.out_dim)
    patch_head = 2 * (d * s.hidden_dim + s.hidden_dim ** 2 + s.hidden_dim * s.bottleneck_dim
                      + s.bottleneck_dim * (s.patch_out_dim or s.out_dim))
    g_tokens = (side // step) ** 2
    glob = encoder_token_flops(cfg, side, bottleneck=False) + head
    if s.method in ("ibot", "dinov2"):
        glob += g_tokens * patch_head
    loc = encoder_token_flops(cfg, local, bottleneck=False) + head
    return 3 * (2 * glob + s.local_crops * loc) + 2 * glob


def _disc_forward(cfg: "RunConfig") -> int:
    """One forward of the frozen ViT-S/8 discriminator backbone at ``finetune.disc_image_size``."""
    n = (cfg.finetune.disc_image_size // 8) ** 2 + 1
    return 12 * _block(n, 384) + 2 * (n - 1) * 384 * 3 * 64


def _train_images(cfg: "RunConfig") -> int:
    return cfg.data.train_size if cfg.data.name == "synthetic" else IMAGENET_TRAIN


def _finetune_flops(cfg: "RunConfig", tok: dict[str, int], lpips: int, world: int) -> float:
    """Decoder fine-tuning: images = epochs x train split (or steps x global batch); per image
    encoder fwd + decoder fwd+bwd (+ LPIPS); from the discriminator's start, its D step (real
    + fake forwards of the frozen backbone) and from the adversarial start, the G term's
    forward + backward through the backbone to the image (≈ 2 forwards)."""
    ft = cfg.finetune
    if ft.steps is None and ft.epochs:
        images, start_d, start_g = ft.epochs * _train_images(cfg), ft.disc_start_epoch, ft.adv_start_epoch
        length = ft.epochs
    else:
        steps = ft.steps or cfg.train.steps
        images = steps * (ft.batch_size or cfg.data.batch_size * world)
        start_d, start_g, length = ft.disc_start_step, ft.adv_start_step, steps
    frac_d, frac_g = (max(0.0, 1 - start / length) for start in (start_d, start_g))
    per_image = tok["encoder"] + 3 * tok["decoder"] + lpips + _disc_forward(cfg) * (2 * frac_d + 2 * frac_g)
    return float(per_image) * images


def stage_flops(stage: str, cfg: "RunConfig", world: int = 1) -> float | None:
    """Total FLOPs of one run's ``stage`` (None: no model of that stage's compute)."""
    tok = tokenizer_flops(cfg)
    lpips = 3 * vgg16_flops(cfg.data.image_size) if cfg.loss.lpips_weights and cfg.loss.perceptual else 0
    inception = INCEPTION_FLOPS if cfg.eval.fid_backbone == "inception" or (
        cfg.eval.fid_backbone == "auto" and cfg.eval.inception_weights) else 0
    if stage == "tokenizer":
        per_image = 3 * tok["total"] + lpips + _ssl_flops(cfg)
        return float(per_image) * cfg.train.steps * cfg.data.batch_size * world
    if stage == "finetune":
        return _finetune_flops(cfg, tok, lpips, world)
    if stage == "evaluate":
        e = cfg.eval
        lp = 2 * vgg16_flops(cfg.data.image_size) if cfg.loss.lpips_weights else 0
        return float(e.num_samples * (tok["total"] + 2 * inception + lp) + (e.probe_train + e.probe_val) * tok["encoder"])
    if stage == "generator":
        g = cfg.generator
        if not g.enabled:
            return 0.0
        train_images = _train_images(cfg)
        dit = dit_flops(cfg)
        per_sample = g.sample_steps * dit * (2 if g.sampler == "heun" else 1) * (1 if g.cfg_scale == 1.0 else 2)
        evals = len(set(g.eval_at) | {g.steps})
        return float(train_images * tok["encoder"] + 3 * dit * g.steps * g.batch_size
                     + evals * g.num_samples * (per_sample + tok["decoder"] + inception))
    return None


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

    @property
    def unit(self) -> str:
        return "GPU-h" if self.gpus else "core-h"


def estimate(plan: "Plan", spec: "SweepFile") -> list[StageCost]:
    """Per-stage cost of every (run, stage) in ``plan`` (see the module docstring)."""
    from orchestrator.stages import DISTRIBUTED_STAGES

    cs: CostSpec = getattr(spec, "cost", None) or CostSpec()
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
            rate = cs.gpu_peak_tflops * 1e12 * cs.mfu if res.gpus else cs.cpu_gflops_per_core * 1e9
            wall_h = flops / (used * rate) / 3600
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


def describe(costs: list[StageCost], spec: "SweepFile") -> str:
    """The estimate as a table for ``--dry-run``."""
    from tabulate import tabulate

    cs: CostSpec = getattr(spec, "cost", None) or CostSpec()
    rows = []
    for c in costs:
        rows.append([c.stage, c.runs, f"{c.flops / max(c.runs - c.unknown, 1) / 1e15:.4g}", f"{c.flops / 1e15:.4g}",
                     f"{c.wall_h_max:.3g}", f"{c.est_hours:.4g} {c.unit}",
                     f"{c.requested_hours:.4g} {c.unit} ({c.gpus or spec.stages[c.stage].resources.cpus}"
                     f" x {c.time_limit_h:.3g} h x {c.runs})", "; ".join(c.notes)])
    gpu = sum(c.est_hours for c in costs if c.gpus)
    cpu = sum(c.est_hours for c in costs if not c.gpus)
    req_gpu = sum(c.requested_hours for c in costs if c.gpus)
    head = (f"cost estimate (FLOPs = 2·MACs, fwd+bwd = 3x fwd; GPU stages at {cs.mfu:g} MFU of "
            f"{cs.gpu_peak_tflops:g} TFLOP/s per GPU [dense bf16, NVIDIA H100/H200 SXM datasheet], "
            f"CPU stages at {cs.cpu_gflops_per_core:g} GFLOP/s per core; sweep key `cost:`):")
    table = tabulate(rows, headers=["stage", "runs", "PFLOP/run", "PFLOP total", "longest run (wall h)",
                                    "estimated", "requested (units x limit x runs)", "notes"], tablefmt="simple")
    parts = ([f"{gpu:.4g} GPU-h (requested {req_gpu:.4g} GPU-h)"] if any(c.gpus for c in costs) else []) + (
        [f"{cpu:.4g} CPU core-h"] if any(not c.gpus for c in costs) else [])
    total = f"sweep total: {sum(c.flops for c in costs) / 1e15:.4g} PFLOP, estimated " + " + ".join(parts)
    return "\n".join([head, table, total])


def to_dict(costs: list[StageCost]) -> list[dict[str, Any]]:
    return [{"stage": c.stage, "runs": c.runs, "pflops": c.flops / 1e15, "estimated_hours": c.est_hours,
             "unit": c.unit, "requested_hours": c.requested_hours, "wall_h_max": c.wall_h_max, "notes": c.notes}
            for c in costs]


# ----------------------------------------------------------------------------- actual cost, after


FINAL = ("finished", "failed", "cancelled")
MEASURED = ("sacct", "wallclock")  # backbones of the rows written here


def parse_tres(tres: str) -> dict[str, int]:
    """``billing=8,cpu=64,gres/gpu:h100=8,mem=480G,node=1`` -> ``{"cpu": 64, "gpu": 8, ...}``."""
    out: dict[str, int] = {}
    for item in filter(None, (tres or "").split(",")):
        key, _, value = item.partition("=")
        if key.startswith("gres/gpu"):
            key = "gpu"  # typed (gres/gpu:h100) or plain; take the plain total when both appear
            if "gpu" in out and ":" in item.split("=")[0]:
                continue
        m = re.match(r"^\d+", value)
        if m:
            out[key] = int(m.group(0))
    return out


def slurm_usage(job_ids: list[str]) -> dict[str, dict[str, float]]:
    """``{job_id: {"elapsed_s", "gpus", "cpus"}}`` of ended jobs, from ONE ``sacct`` call
    (ids ``123`` / ``123_4``)."""
    from orchestrator import slurm

    wanted = set(job_ids)
    if not wanted:
        return {}
    bases = sorted({j.split("_")[0] for j in wanted})
    text = slurm._run(["sacct", "-X", "-n", "-P", "-o", "JobID,ElapsedRaw,AllocTRES,State", "-j", ",".join(bases)],
                      timeout=120)
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4 or parts[0] not in wanted or not parts[1].strip().isdigit():
            continue
        if (parts[3].split() or ["?"])[0] in slurm.ACTIVE_STATES:
            continue  # still running (or requeued): its elapsed time is not final
        tres = parse_tres(parts[2])
        out[parts[0]] = {"elapsed_s": float(parts[1]), "gpus": tres.get("gpu", 0), "cpus": tres.get("cpu", 0)}
    return out


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
    # measured once per attempt: a retried stage's new attempt replaces its predecessor's row
    todo = [r for r in rows if have.get((r.id, r.stage)) != (r.attempt or r.result_attempt or 1)]
    if not todo:
        return 0
    slurm_ids = [r.slurm_job_id for r in todo if r.slurm_job_id]
    usage = slurm_usage(slurm_ids) if slurm_ids and slurm.available() else {}
    cpus = _requested_cpus(store, sweep)
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
            value = (r.ended_at - r.started_at).total_seconds() * cpus.get(r.stage, 1) / 3600
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


def _requested_cpus(store, sweep: str) -> dict[str, int]:
    from orchestrator.submit import stored_sweep

    spec = stored_sweep(store, sweep)
    return {name: st.resources.cpus for name, st in spec.stages.items()} if spec is not None else {}
