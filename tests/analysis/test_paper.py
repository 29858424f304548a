"""The paper's reference data: transcription checks against the paper's own arithmetic and
against the experiments that several tables report twice."""
from __future__ import annotations

import pytest

from analysis.common import prepare
from analysis.paper import PaperDataError, load_paper_data, paper_runs, paper_table, structure_loss_from_accuracy


def test_table1_structure_loss_follows_from_its_accuracy_columns():
    t = paper_table("table1")
    assert list(t["label"]) == ["64", "32", "16", "8", "8 (w/ STC)"]
    for row in t.to_dict("records"):
        derived = structure_loss_from_accuracy(row["probe_acc_before"], row["probe_acc_after"])
        assert round(derived, 2) == pytest.approx(row["structure_loss"], abs=1e-9), row["label"]
    # the paper's example: patch 16, 1 - 18.1/58.4 = 0.69
    assert round(structure_loss_from_accuracy(58.4, 18.1), 2) == 0.69


def _row(table, label):
    t = paper_table(table)
    return t[t["label"] == label].drop(columns="label").iloc[0].dropna().to_dict()


@pytest.mark.parametrize("a, b", [
    (("table2", "w/o SSL, ✗"), ("table3", "8 ✗")),
    (("table2", "w/ SSL, ✗"), ("table3", "8 ✓")),
    (("table2", "w/o SSL, ✓"), ("table8", "Two-layer convolution")),
    (("table2", "w/o SSL, ✗"), ("table10", "128")),
    (("table2", "w/o SSL, ✓"), ("table10", "128 STC")),
    (("table3", "16 ✓"), ("table9", "0.1")),
    (("table3", "16 ✓"), ("table6_ssl_method", "iBOT")),
])
def test_experiments_reported_twice_agree(a, b):
    ra, rb = _row(*a), _row(*b)
    shared = set(ra) & set(rb)
    assert len(shared) >= 4
    assert {k: ra[k] for k in shared} == {k: rb[k] for k in shared}


def test_split_depth_rows_match_table2_and_table1_gfid_matches_table3():
    k = paper_table("table6_split_depth").set_index("label")
    t2 = paper_table("table2").set_index("label")
    assert k.loc["6", "inception_score"] == t2.loc["w/ SSL, ✓", "inception_score"]
    assert k.loc["12", "rfid"] == t2.loc["w/ SSL, ✗", "rfid"]
    t1 = paper_table("table1").set_index("label")["gfid"]
    t3 = paper_table("table3").set_index("label")["gfid"]
    for p in ("64", "32", "16", "8"):
        assert t1[p] == t3[f"{p} ✓"]


def test_paper_runs_have_the_runs_table_shape_and_name_their_source():
    for name in load_paper_data():
        df = paper_runs(name)
        assert {"run_hash", "sweep", "status"} <= set(df.columns)
        assert (df["sweep"] == "paper").all() and df["run_hash"].str.startswith(f"paper:{name}:").all()
        if "rfid" in df:
            assert (df.loc[df["rfid"].notna(), "rfid_backbone"] == "paper:inception-v3").all()
    t2 = prepare(paper_runs("table2"))
    assert list(t2["stc"]) == [False, True, False, True]  # k=6 of a 12-layer encoder
    assert list(t2["tokens"]) == [1024.0] * 4  # (256/8)^2
    assert list(prepare(paper_runs("table9"))["lambda_ssl"]) == [0.1, 1.0, 10.0]


def test_table10_copy_error_is_flagged():
    df = paper_runs("table10")
    assert df.loc[df["paper_label"] == "128 SSL", "paper_suspect"].item() is True
    assert df["paper_suspect"].sum() == 1


def test_malformed_reference_file_names_table_and_row(tmp_path):
    bad = tmp_path / "paper.yaml"
    bad.write_text("tables:\n  t:\n    columns: {rFID: rfid}\n    rows:\n      - {label: a, metrics: {gfid: 1.0}}\n")
    with pytest.raises(PaperDataError, match=r"table 't' row 0: metrics \['gfid'\]"):
        load_paper_data(bad)


def test_scaling_laws_doc_holds_the_paper_extrapolation_the_code_computes():
    from pathlib import Path

    from analysis.paper_check import markdown, paper_extrapolation

    table = paper_extrapolation()
    assert len(table) == 4 and set(table["target tokens"]) == {"1024"}
    doc = (Path(__file__).resolve().parents[2] / "docs" / "scaling_laws.md").read_text()
    assert markdown(table) in doc
