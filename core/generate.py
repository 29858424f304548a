"""Generator stage: train a DiT on a tokenizer's latents, measure gFID and IS.

    python -m core.generate CONFIG.yaml --tokenizer-dir DIR --out-dir DIR

Pipeline: encode the train split with the (EMA) tokenizer into memory-mapped float32
shards (``data.num_workers`` loader workers; core.generator.latents) -> per-channel
normalisation on access -> flow-matching DiT training (core.generator.train) -> after each
step of ``generator.eval_at`` and after the last step: ``generator.num_samples`` samples of
the EMA model with uniform class labels (label i mod K: N/K per class, e.g. 50 per class
for 50k on ImageNet), sampled on every rank of the stage (each its share; bf16 autocast
when ``train.precision`` is bf16 on CUDA), decoded by the tokenizer -> gFID and IS
(core.generator.gfid; backbone from ``eval``, recorded beside each number).  The gFID
reference is ``eval.fid_reference`` (precomputed mu/sigma, e.g. ADM's ImageNet-256 batch)
when set, else a class-balanced subset of ``generator.num_samples`` val images
(``core.data.balanced_subset``, ``eval.subset_seed``); ``info.gfid_reference`` says which.

Writes ``out_dir/{config.yaml, log.jsonl, latents_train/, latent_stats.pt, checkpoints/,
samples.png, result.json}``.  Called again it resumes from the latest checkpoint, or
returns the existing result when ``result.json`` is complete.  A finished generator asked
for more steps or more ``generator.eval_at`` points after its last step (the length keys,
:data:`core.stage.LENGTH_KEYS`) is continued from its last checkpoint, evaluating only the
new points; ``result.json`` then holds every point, old and new.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from core import stage as S
from core.config import ConfigError, RunConfig, load_config
from core.data import balanced_subset, build_dataset, dataset_labels, subset_info
from core.eval.fid import IS_RULE, LEGACY_IS_RULE, FidelityFeatures, load_reference_statistics, resolve_backbone
from core.generator.gfid import generator_fidelity, real_statistics
from core.generator.latents import NormalizedLatents, cache_latents, load_or_compute_stats
from core.generator.train import eval_steps, resolve_shift, train_generator
from core.io import write_json_atomic
from core.models.load import load_tokenizer
from core.seed import seed_everything
from core.trainer import distributed as D
from core.trainer.compile import use_compile

STAGE = "generator"
METRICS = ("gfid", "inception_score", "generator_train_time_s")


def _finished_step(done: dict) -> int:
    """The last step of a finished generator (its ``generator_train_time_s`` row)."""
    return max(m["step"] for m in done["metrics"] if m["name"] == "generator_train_time_s")


def _is_rules(metrics: list[dict], earlier: dict, before: int | None) -> dict[str, list[int]]:
    """IS split rule -> the steps whose IS it scored.  A result continued from step ``before``
    keeps its earlier points' rules (``earlier``: that result's info; results written before
    the rule was recorded used :data:`LEGACY_IS_RULE`), so analysis never mixes the two."""
    steps = sorted(m["step"] for m in metrics if m["name"] == "inception_score")
    rules = {rule: list(at) for rule, at in (earlier.get("inception_score_rules") or {}).items()}
    if before is not None and not rules:
        rules = {earlier.get("inception_score_rule", LEGACY_IS_RULE): [s for s in steps if s <= before]}
    old = {s for at in rules.values() for s in at}
    new = [s for s in steps if s not in old]
    if new:
        rules[IS_RULE] = sorted(rules.get(IS_RULE, []) + new)
    return rules


def _extends(done: dict, cfg: RunConfig, out_dir: Path) -> bool:
    """Whether ``cfg`` asks the finished generator ``done`` for more (steps or later eval points).

    Raises
    ------
    StageMismatch when it asks for less (fewer steps) or for an evaluation before the finished
    step, which no continuation can measure.
    """
    final = _finished_step(done)
    measured = {m["step"] for m in done["metrics"] if m["name"] == "gfid"}
    gen = cfg.generator
    holds = f"a generator finished at step {final} (gFID at steps {sorted(measured)})"
    if gen.steps < final:
        raise S.StageMismatch(out_dir, holds, {"generator.steps": (final, gen.steps)},
                              "a finished generator is not shortened; use a new directory")
    missed = [s for s in eval_steps(gen) if s <= final and s not in measured]
    if missed:
        raise S.StageMismatch(out_dir, holds, {"generator.eval_at": (sorted(measured), gen.eval_at)},
                              f"steps {missed} lie before step {final} and cannot be measured by continuing; "
                              "use a new directory")
    return gen.steps > final


def generate(cfg: RunConfig, tokenizer_dir: str | Path, out_dir: str | Path, stop_at_step: int | None = None) -> dict:
    """Train the generator on the tokenizer in ``tokenizer_dir`` and measure gFID/IS.

    Under torchrun / submitit (WORLD_SIZE > 1) every rank calls it: latents are cached and
    the DiT is trained data-parallel (``generator.batch_size`` is the global batch), every
    rank samples its share of each evaluation, and rank 0 writes.

    Parameters
    ----------
    cfg : the run's resolved config (``generator``, ``data``, ``eval``, ``train.seed``,
        ``train.device``/``precision``, ``train.ckpt_every``/``keep_last``/``log_every``).
    tokenizer_dir : run directory of a finished tokenizer stage (``core.train.train``).
    out_dir : this stage's directory.
    stop_at_step : stop after this many generator steps, with a checkpoint, without writing
        result.json (staged runs, tests); the returned dict then has ``"stopped_at"``.

    Returns
    -------
    The ``result.json`` content: metrics ``gfid`` and ``inception_score`` (one row per
    evaluated generator step, with the backbone) and ``generator_train_time_s``.

    Raises
    ------
    StageMismatch (a ConfigError) when ``out_dir`` or the tokenizer holds a run of another
    config, or when a finished generator is asked for fewer steps or a past evaluation point.
    """
    out_dir = Path(out_dir).resolve()
    done = S.done(out_dir, STAGE, METRICS)
    if done is not None and not _extends(done, cfg, out_dir):
        return done
    info = D.init_distributed(cfg.train.device, out_dir)  # rank 0 locks out_dir until cleanup
    try:
        return _generate(cfg, tokenizer_dir, out_dir, stop_at_step, info, done)
    finally:
        D.cleanup(info)


def _generate(cfg: RunConfig, tokenizer_dir: str | Path, out_dir: Path, stop_at_step: int | None,
              dist_info: D.DistInfo, done: dict | None) -> dict:
    result_path = out_dir / "result.json"
    S.claim(cfg, out_dir, STAGE, "a generator run", write=False)  # every rank raises alike, before anyone writes
    D.barrier(dist_info)
    if dist_info.is_main:
        S.claim(cfg, out_dir, STAGE, "a generator run")  # a longer run of the same stage: config.yaml updated
    D.barrier(dist_info)
    gen = cfg.generator
    seed = seed_everything(cfg.train.seed)
    device = dist_info.device
    bf16 = cfg.train.precision == "bf16" and device.type == "cuda"  # training and sampling alike

    tokenizer, tok_cfg = load_tokenizer(tokenizer_dir, ema=True)
    S.check_tokenizer(tok_cfg, cfg, tokenizer_dir)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    backbone = resolve_backbone(cfg.eval)
    features = FidelityFeatures(backbone, cfg.eval.inception_weights, isc=True, device=device.type)
    reference: dict = {}  # the gFID reference: name (recorded in info), statistics
    if cfg.eval.fid_reference:
        # Loaded (and its width checked against the backbone) before any training, so a wrong
        # file fails in seconds, not after latent caching and training.
        probe = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size, dtype=torch.uint8)
        dim = features.features(probe)[0].shape[1]
        reference["stats"], reference["name"] = load_reference_statistics(cfg.eval.fid_reference, dim)
        reference["num_real"] = None
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    if not reference:  # described now (labels only), statistics computed at the first evaluation
        n_real = min(gen.num_samples, len(val_set))
        reference["subset"] = subset_info(dataset_labels(val_set), balanced_subset(dataset_labels(val_set), n_real,
                                                                                    cfg.eval.subset_seed),
                                          cfg.eval.subset_seed)
        reference["name"] = f"balanced-val-subset:{n_real}:seed={cfg.eval.subset_seed}"
        reference["num_real"] = n_real
    num_classes = train_set.num_classes
    latents = cache_latents(tokenizer, train_set, out_dir / "latents_train", cfg.eval.batch_size, device,
                            num_workers=cfg.data.num_workers, rank=dist_info.rank, world_size=dist_info.world_size)
    stats = load_or_compute_stats(out_dir / "latent_stats.pt", latents)
    latent_shape = tuple(latents.shape[1:])

    shift = resolve_shift(gen, latent_shape)
    samples_png = out_dir / "samples.png"

    def evaluate(ema, step: int) -> list[dict]:
        # Collective: every rank samples its share and returns the same rows.
        if "stats" not in reference:
            reference["stats"], _ = real_statistics(val_set, gen.num_samples, cfg.eval.subset_seed, features,
                                                    cfg.eval.batch_size, cfg.data.num_workers, dist_info)
        out = generator_fidelity(ema, tokenizer, stats, reference["stats"], features, n=gen.num_samples,
                                 num_classes=num_classes, latent_shape=latent_shape, gen=gen, shift=shift,
                                 seed=seed + step, batch_size=cfg.eval.batch_size, info=dist_info, bf16=bf16,
                                 grid_path=samples_png)
        return [S.metric_row(name, out[name], step, features.backbone, gen.num_samples)
                for name in ("gfid", "inception_score")]

    out = train_generator(
        gen, NormalizedLatents(latents, stats), latents.labels, num_classes, out_dir, seed=seed, device=device,
        evaluate=evaluate,
        ckpt_every=cfg.train.ckpt_every, keep_last=cfg.train.keep_last, log_every=cfg.train.log_every,
        bf16=bf16, stop_at_step=stop_at_step,
        dist_info=dist_info, compile=use_compile(cfg.train, device),
    )
    if out["step"] > gen.steps:
        raise S.StageMismatch(out_dir, f"a generator checkpoint at step {out['step']}",
                              {"generator.steps": (out["step"], gen.steps)}, "use a new directory")
    if out["step"] < gen.steps:
        return {"stage": STAGE, "stopped_at": out["step"], "out_dir": str(out_dir)}
    metrics = list(out["metrics"])
    metrics.append(S.metric_row("generator_train_time_s", out["train_time_s"], out["step"]))
    ckpts = sorted((out_dir / "checkpoints").glob("step_*.pt"))
    earlier = (done or {}).get("info", {})  # the finished result this run continues, if any
    before = _finished_step(done) if done else None
    result = {
        "stage": STAGE,
        "metrics": metrics,
        "artifacts": [{"kind": "checkpoint", "path": str(ckpts[-1])}, {"kind": "samples", "path": str(samples_png)},
                      {"kind": "latent_stats", "path": str(out_dir / "latent_stats.pt")}],
        "info": {
            "complete": True, "seed": seed, "device": device.type, "world_size": dist_info.world_size,
            "fid_backbone": backbone,
            "generator_size": gen.size, "generator_params": out["ema"].num_params(),
            "latent_shape": list(latent_shape), "time_shift": shift, "num_classes": num_classes,
            "num_train_latents": len(latents), "latent_cache": {"dtype": latents.index["dtype"],
                                                                "shards": len(latents.index["shards"])},
            "gfid_reference": reference.get("name"), "num_real": reference.get("num_real"),
            "real_subset": reference.get("subset"),
            "sample_labels": {"scheme": "uniform (i mod K)", "per_class_min": gen.num_samples // num_classes,
                              "per_class_max": -(-gen.num_samples // num_classes)},
            "sample_noise": "sample i: core.seed.step_generator(seed + step, i, stream 7)",
            "sample_precision": "bf16-autocast" if bf16 else "fp32", "inception_score_rule": IS_RULE,
            "inception_score_rules": _is_rules(metrics, earlier, before),
            "sampler": gen.sampler,
            "sample_steps": gen.sample_steps, "cfg_scale": gen.cfg_scale,
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            # finished steps this stage was continued from (a longer generator.steps / later eval_at)
            "continued_from": earlier.get("continued_from", []) + ([before] if done else []),
            "steps": out["step"],
        },
    }
    if dist_info.is_main:
        write_json_atomic(result_path, result)
    D.barrier(dist_info)
    return result if dist_info.is_main else S.done(out_dir, STAGE, METRICS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.generate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--tokenizer-dir", required=True, help="finished tokenizer run directory")
    parser.add_argument("--out-dir", required=True, help="output directory of this stage")
    args = parser.parse_args(argv)
    try:
        result = generate(load_config(args.config), args.tokenizer_dir, args.out_dir)
    except (ConfigError, FileNotFoundError) as e:  # bad input: exit 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in result["metrics"]:
        print(f"{row['name']:>24s} step {row['step']:>7d}: {row['value']:.4f}" + (f" ({row['backbone']})" if row["backbone"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
