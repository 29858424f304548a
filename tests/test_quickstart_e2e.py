"""End to end: a minimal quickstart (two runs, tiny steps) through `orchestrate submit --wait`
(local executor, real core stages) and `orchestrate figures`, checking the rows and the files."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
EVERY_METRIC = [
    "rfid", "psnr", "ssim", "lpips", "probe_acc_before", "probe_acc_after", "structure_loss",
    "gflops_encoder", "gflops_decoder", "gflops_total", "params_encoder", "params_decoder",
    "gfid", "inception_score", "train_loss",
]


def orchestrate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_minimal_quickstart_submit_wait_and_figures(tmp_path):
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    spec["name"] = "quickstart_e2e"
    spec["base"]["data"].update(train_size=128, val_size=64, batch_size=16)
    spec["base"]["train"].update(steps=6, ckpt_every=3, log_every=3)
    spec["base"]["eval"].update(num_samples=32, probe_train=64, probe_val=32, batch_size=32)
    spec["base"]["generator"].update(steps=6, batch_size=16, num_samples=32, sample_steps=4, eval_at=[3])
    spec["axes"] = {"model.patch_size": [8], "model.split_depth": [2, None]}
    spec.pop("seeds", None)  # one seed: two runs, whatever the quickstart's seed list is
    spec["runs_dir"] = str(tmp_path / "runs")
    sweep = tmp_path / "qs.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    db = f"sqlite:///{tmp_path / 'results.db'}"

    out = orchestrate("submit", str(sweep), "--wait", "--db", db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

    out = orchestrate("query", "--sweep", "quickstart_e2e", "--format", "csv", "--db", db, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    csv = tmp_path / "rows.csv"
    csv.write_text(out.stdout)
    rows = pd.read_csv(csv)
    assert len(rows) == 2 and set(rows["status"]) == {"finished"}
    for metric in EVERY_METRIC:
        assert metric in rows.columns, metric
        assert rows[metric].notna().all(), (metric, rows[metric].tolist())
    assert set(rows["rfid_backbone"]) == {"embedded-featnet-v1"}  # no Inception weights offline: named proxy
    assert (rows["structure_loss"] - (1 - rows["probe_acc_after"] / rows["probe_acc_before"])).abs().max() < 1e-9

    # Re-submitting the same sweep submits nothing.
    out = orchestrate("submit", str(sweep), "--db", db, cwd=tmp_path)
    assert out.returncode == 0 and "0 runs to submit" in out.stdout, out.stdout

    figs = tmp_path / "figs"
    out = orchestrate("figures", "--db", db, "--out", str(figs), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ["fig4_stc_scaling.png", "fig4_stc_scaling.pdf", "table1_structure_loss.md",
                 "table1_structure_loss.tex", "fig6_convergence.png", "fig8_gflops.png"]:
        assert (figs / name).stat().st_size > 0, name
        assert str(figs / name) in out.stdout


def test_quickstart_grid_gives_a_fitted_curve_and_a_prediction_table(tmp_path):
    """The quickstart's three patch sizes (4, 16, 64 tokens at 32 px) × 2 seeds, at tiny steps:
    `figures` fits each line's token-scaling curve and predicts its 64-token point from the
    4- and 16-token runs (issue 17 §6)."""
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    assert len(spec["axes"]["model.patch_size"]) >= 3 and len(spec["seeds"]) >= 2
    spec["name"] = "quickstart_fit"
    spec["base"]["data"].update(train_size=128, val_size=64, batch_size=16)
    spec["base"]["train"].update(steps=4, ckpt_every=4, log_every=2)
    spec["base"]["eval"].update(num_samples=32, probe_train=64, probe_val=32, batch_size=32)
    spec["base"]["generator"].update(steps=4, batch_size=16, num_samples=32, sample_steps=2, eval_at=[])
    spec["axes"] = {"model.patch_size": spec["axes"]["model.patch_size"], "model.split_depth": [2]}
    spec["seeds"] = spec["seeds"][:2]
    spec["runs_dir"] = str(tmp_path / "runs")
    sweep = tmp_path / "qs.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    db = f"sqlite:///{tmp_path / 'results.db'}"
    out = orchestrate("submit", str(sweep), "--wait", "--db", db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    figs = tmp_path / "figs"
    out = orchestrate("figures", "--db", db, "--out", str(figs), "--only", "fits,predictions", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    fits = (figs / "fits.md").read_text()
    assert "| tokens |" in fits and "| 6 | 3 |" in fits  # 3 token counts × 2 seeds fitted
    table = (figs / "predictions_holdout.md").read_text()
    assert "tokens 4, 16" in table and "tokens 64" in table and "A·T^(−α)" not in table
    assert "A*T^-alpha" in table  # two token counts left: the 2-parameter law
