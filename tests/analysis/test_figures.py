"""Every figure/table function on a database built from result files (synthetic values with
missing cells): files written, numbers in the tables, warnings naming what is missing."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis.common import Output, aggregate, metric_label, prepare
from analysis.fig8_gflops import _panel
from analysis.registry import REGISTRY, generate
from orchestrator.commands.figures import load_frames
from orchestrator.db.store import Store

from analysis_db import build_db, grid_specs

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def frames(grid_db):
    store = Store(grid_db, readonly=True)
    runs, history = load_frames(store)
    store.dispose()
    return runs, history


@pytest.fixture(scope="module")
def generated(frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    runs, history = frames
    return out, {o.name: o for o in generate(runs, out, history, with_paper=True)}


def _warnings(outputs) -> str:
    return "\n".join(w for o in outputs.values() for w in o.warnings)


def test_every_entry_writes_its_files(generated):
    out, outputs = generated
    assert set(REGISTRY) < set(outputs)
    for name in REGISTRY:
        files = outputs[name].files
        if name == "joint_fits":  # the grid's decoder direction has 5 runs on a line: below the 6 it needs
            assert not files and "no joint fit" in outputs[name].warnings[0]
            continue
        if name == "predictions":  # one seed per point: 2 runs below the largest token count, too few
            assert not files and "to hold one out" in outputs[name].warnings[0]
            continue
        assert files, (name, outputs[name].warnings)
        for f in files:
            assert f.exists() and f.stat().st_size > 500, f
            head = f.read_bytes()[:8]
            if f.suffix == ".png":
                assert head == b"\x89PNG\r\n\x1a\n"
            elif f.suffix == ".pdf":
                assert head.startswith(b"%PDF")
        kinds = {f.suffix for f in files}
        want = {".png", ".pdf"} if name.startswith("fig") else {".md", ".tex"}
        assert kinds == (want | {".json"} if name == "fits" else want), name
    assert "failed:" not in _warnings(outputs)
    assert (out / "paper" / "table4.md").exists()  # --with-paper: the paper's tables as printed


def test_table3_numbers_and_proxy_backbone_labels(generated):
    out, _ = generated
    md = (out / "table3_ssl.md").read_text()
    assert "rFID [embedded-featnet-v1]" in md and "gFID [embedded-featnet-v1]" in md
    assert "LPIPS [lpips-substitute-x]" in md and "PSNR (dB) |" in md
    lines = {tuple(c.strip() for c in l.strip("|").split("|")[:4]): l for l in md.splitlines() if l.startswith("| ")}
    # patch 8 -> 16 tokens: rFID = 100/16 + 2 = 8.25, gFID = 80 (no SSL) / 75 (SSL)
    row = lines[("8", "16", "✗", "micro")]
    assert "| 8.25 |" in row and "| 80.00 |" in row and "| 3.00 |" in row
    assert "| 75.00 |" in lines[("8", "16", "✓ ibot", "micro")]
    assert "| 3.56 |" in lines[("4", "64", "✗", "micro")]  # 100/64 + 2
    tex = (out / "table3_ssl.tex").read_text()
    assert r"\begin{tabular}" in tex and "8.25" in tex and r"\checkmark ibot" in tex


def test_table1_probe_columns_and_paper_columns(generated):
    out, _ = generated
    md = (out / "table1_structure_loss.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| 8 | 16 |")]
    # patch 8: acc_before = 0.30 + 0.01*4 -> 34.0 %; no STC keeps 1/4 (loss 0.75), STC 1/2 (0.50)
    assert any("| 34.0 |" in r and "| 8.5 |" in r and "| 0.75 |" in r for r in rows)
    assert any("| 17.0 |" in r and "| 0.50 |" in r for r in rows)
    # the paper's patch-64 row (16 tokens, no STC, iBOT) sits beside the matching user row
    match = [r for r in rows if "| 4 (no STC) |" in r and "✓ ibot" in r]
    assert len(match) == 1 and "| 29.5 |" in match[0] and "| 0.79 |" in match[0] and match[0].rstrip().endswith("| 64 |")
    assert "| 8 (w/ STC) |" in md  # paper rows without a counterpart are appended
    no_ssl = [r for r in rows if "| 4 (no STC) | micro | ✗ |" in r]
    assert len(no_ssl) == 1 and no_ssl[0].rstrip().endswith("| 1 |  |")  # iBOT paper row: no match


def test_paper_rows_never_match_a_different_constant_setting(frames, tmp_path):
    """Without SSL anywhere in the data (SSL not a row key), Table 1's iBOT rows match nothing."""
    runs, _ = frames
    out = REGISTRY["table1_structure_loss"].fn(runs[runs["ssl.method"] == "none"], tmp_path, with_paper=True)
    md = (tmp_path / "table1_structure_loss.md").read_text()
    assert out.files and "SSL" not in md.splitlines()[2].split("| gFID")[0]
    user = [l for l in md.splitlines() if l.startswith("| ") and "micro" in l]
    assert user and all(l.rstrip().endswith("|  |") for l in user)
    assert md.count("| 64 | 16 |") == 1  # the paper's patch-64 row, appended on its own


def test_missing_cells_are_named(generated):
    _, outputs = generated
    w = "\n".join(outputs["table3_ssl"].warnings)
    assert "gfid missing for p=2, no SSL" in w and "inception_score missing" in w
    assert "lpips missing for SSL ibot, STC k=2" in "\n".join(outputs["table2_stc"].warnings)
    fig3 = "\n".join(outputs["fig3_naive_scaling"].warnings)
    assert "gfid missing" in fig3 and "no run for enc micro, dec mini" in fig3
    assert "one value of compression module only" in "\n".join(outputs["table8_compression"].warnings)


def test_fig8_draws_both_scaling_directions(frames):
    runs, _ = frames
    df = prepare(runs)
    df = df[(~df["stc"]) & (df["ssl"] == "none")]
    agg = aggregate(df, ["model.decoder_size", "model.patch_size"], ["gfid", "gflops_total"])
    fig, ax = matplotlib.pyplot.subplots()
    assert _panel(ax, agg) == 4  # micro p4/p8, mini p4/p8 (micro p2 has no gFID)
    labels = sorted(l.get_label() for l in ax.lines)
    assert labels == ["decoder ↑ (p=4)", "decoder ↑ (p=8)", "tokens ↑ (dec micro, patch ↓)",
                      "tokens ↑ (dec mini, patch ↓)"]
    mini = next(l for l in ax.lines if l.get_label() == "tokens ↑ (dec mini, patch ↓)")
    # sorted by GFLOPs: p8 (16 tokens, 0.32) then p4 (64 tokens, 1.28); gFID 78 for both
    assert np.allclose(mini.get_xdata(), [0.32, 1.28]) and np.allclose(mini.get_ydata(), [78.0, 78.0])
    matplotlib.pyplot.close(fig)


def test_fig6_uses_the_per_step_history(frames, tmp_path):
    runs, history = frames
    assert set(history["step"].dropna()) == {50, 300}
    out = REGISTRY["fig6_convergence"].fn(runs, history, tmp_path)
    assert [f.name for f in out.files] == ["fig6_convergence.png", "fig6_convergence.pdf"]
    empty = REGISTRY["fig6_convergence"].fn(runs, history.iloc[0:0], tmp_path / "none")
    assert not empty.files and "no gfid/inception_score history" in empty.warnings[0]


def test_no_data_skips_with_warnings_never_crashes(tmp_path):
    outputs = generate(pd.DataFrame(columns=["run_hash", "sweep", "status"]), tmp_path, None)
    assert all(not o.files for o in outputs) and all(o.warnings for o in outputs)
    assert not list(tmp_path.iterdir())


def test_tokenizer_only_database(tmp_path):
    """Only GFLOPs recorded (no evaluation, no generator): tables of empty cells are not
    written as numbers, figures needing FIDs are skipped, nothing raises."""
    specs = grid_specs()[:2]
    drop = {(i, m) for i in range(2) for m in ("rfid", "psnr", "ssim", "lpips", "probe_acc_before",
                                               "probe_acc_after", "structure_loss", "gfid", "inception_score")}
    url = build_db(tmp_path, specs, drop=drop)
    runs, history = load_frames(Store(url, readonly=True))
    outputs = {o.name: o for o in generate(runs, tmp_path / "out", history,
                                           only=["fig3_naive_scaling", "fig8_gflops", "fig6_convergence", "table3_ssl"])}
    assert not outputs["fig3_naive_scaling"].files and "figure skipped" in outputs["fig3_naive_scaling"].warnings[-1]
    assert not outputs["fig8_gflops"].files and "skipped" in outputs["fig8_gflops"].warnings[-1]
    assert not outputs["fig6_convergence"].files
    t3 = outputs["table3_ssl"]
    assert not t3.files and t3.warnings[0].startswith("table3_ssl: rfid missing for p=2, no SSL (runs ")
    assert "; p=2, SSL ibot (runs " in t3.warnings[0]
    assert "table skipped" in t3.warnings[-1]


def test_seeds_are_averaged_and_backbones_named():
    runs = pd.DataFrame({
        "run_hash": ["a", "b", "c"], "sweep": "s", "status": "finished",
        "data.image_size": 32, "model.patch_size": 4, "model.encoder_size": "micro", "model.split_depth": None,
        "ssl.method": "none", "train.seed": [0, 1, 0], "model.decoder_size": ["micro", "micro", "mini"], "encoder_depth": 4,
        "rfid": [2.0, 4.0, 1.0], "rfid_backbone": ["embedded-featnet-v1", "inception-v3-compat", "inception-v3-compat"],
    })
    df = prepare(runs)
    assert list(df["k"]) == [4.0] * 3 and not df["stc"].any() and list(df["tokens"]) == [64.0] * 3
    agg = aggregate(df, ["model.decoder_size"], ["rfid"])
    micro = agg[agg["model.decoder_size"] == "micro"].iloc[0]
    assert micro["n"] == 2 and micro["rfid"] == 3.0 and micro["rfid_std"] == pytest.approx(np.sqrt(2))
    assert metric_label("rfid", ["inception-v3-compat"]) == "rFID"
    assert metric_label("gfid", ["embedded-featnet-v1"]) == "gFID [embedded-featnet-v1]"
    out = Output("t")
    from analysis.common import check_backbones
    check_backbones(out, agg, ["rfid"])
    assert "rfid mixes backbones ['embedded-featnet-v1', 'inception-v3-compat']" in out.warnings[0]
