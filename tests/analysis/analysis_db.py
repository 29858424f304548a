"""Test helper of tests/analysis (a unique module name: ``conftest`` is taken elsewhere).

A results database built the way jobs build it: result files written with
``orchestrator.results.write_result_file`` and loaded by ``orchestrator.ingest.ingest``.

Metric values are synthetic (a deterministic function of the config), chosen so that every
expected table cell is a known number.
"""
from __future__ import annotations

from datetime import datetime, timezone

from core.config import config_dict, config_hash, load_config
from core.models.tokenizer import VIT_SIZES
from orchestrator.db.store import Store
from orchestrator.ingest import ingest
from orchestrator.results import make_payload, write_result_file

FEAT = "embedded-featnet-v1"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def synthetic_metrics(cfg) -> dict[str, float]:
    """Known values per config: rFID falls with tokens, STC and SSL lower gFID."""
    tokens = (cfg.data.image_size // cfg.model.patch_size) ** 2
    stc = cfg.model.split_depth is not None and cfg.model.split_depth < 4
    ssl = cfg.ssl.method != "none"
    dec = {"micro": 0.0, "mini": 1.0}[cfg.model.decoder_size]
    before = 0.30 + 0.01 * tokens ** 0.5
    after = before * (0.5 if stc else 0.25)
    return {
        "rfid": round(100.0 / tokens + 2.0 - dec, 4),
        "psnr": round(15.0 + tokens / 32.0, 4),
        "ssim": 0.5, "lpips": 0.3,
        "probe_acc_before": round(before, 4), "probe_acc_after": round(after, 4),
        "structure_loss": round(1 - after / before, 4),
        "gfid": round(80.0 - 10.0 * stc - 5.0 * ssl - 2.0 * dec, 4),
        "inception_score": round(3.0 + stc + ssl, 4),
        "gflops_total": round(0.01 * tokens * (1.0 + dec), 4),
        "encoder_depth": VIT_SIZES[cfg.model.encoder_size].depth,  # recorded by the tokenizer stage
    }


def _write(root, run_hash, sweep, stage, cfg, metrics):
    payload = make_payload(run_hash=run_hash, sweep=sweep, stage=stage, attempt=1, status="finished",
                           started_at=NOW, ended_at=NOW, config=config_dict(cfg), metrics=metrics)
    write_result_file(root / sweep / run_hash, stage, 1, payload)


def build_db(tmp_path, specs, sweep="toy", drop=()):
    """Create ``tmp_path/results.db`` from ``specs`` (lists of dotted overrides).

    ``drop``: (spec index, metric name) pairs left out, to make missing cells.
    Returns the database URL.
    """
    root = tmp_path / "runs"
    for i, overrides in enumerate(specs):
        cfg = load_config(None, {"generator.eval_at": [50], **overrides})
        h = config_hash(cfg)
        vals = {k: v for k, v in synthetic_metrics(cfg).items() if (i, k) not in drop}
        bb = lambda n: FEAT if n in ("rfid", "gfid", "inception_score") else ("lpips-substitute-x" if n == "lpips" else None)  # noqa: E731
        m = lambda names, step: [{"name": n, "value": vals[n], "step": step, "backbone": bb(n)}  # noqa: E731
                                 for n in names if n in vals]
        _write(root, h, sweep, "tokenizer", cfg, m(["gflops_total", "encoder_depth"], 200))
        _write(root, h, sweep, "evaluate", cfg, m(["rfid", "psnr", "ssim", "lpips", "probe_acc_before",
                                                 "probe_acc_after", "structure_loss"], 200))
        if "gfid" in vals:
            # step 50 worse than the final step 300: a convergence curve
            early = [{"name": n, "value": vals[n] + 10.0 * (n == "gfid"), "step": 50, "backbone": FEAT}
                     for n in ("gfid", "inception_score")]
            _write(root, h, sweep, "generator", cfg, early + m(["gfid", "inception_score"], 300))
    url = f"sqlite:///{tmp_path / 'results.db'}"
    return ingested(root, url)


def ingested(root, url: str) -> str:
    """A fresh database at ``url`` (upgraded to head) holding every result file under ``root``."""
    store = Store(url)
    store.upgrade()
    report = ingest(store, [root])
    assert not report.errors, report.errors
    store.dispose()
    return url


def grid_specs():
    """patch 2/4/8 × (no STC, k=2) × SSL none/ibot at 32 px, micro encoder/decoder,
    plus decoder 'mini' at patches 4/8 (no STC, no SSL) for Fig. 8's decoder direction."""
    specs = []
    for p in (2, 4, 8):
        for k in (None, 2):
            for ssl in ("none", "ibot"):
                specs.append({"model.patch_size": p, "model.split_depth": k, "ssl.method": ssl})
    for p in (4, 8):
        specs.append({"model.patch_size": p, "model.decoder_size": "mini"})
    return specs
