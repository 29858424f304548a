"""`orchestrate figures` end to end on a test database."""
from __future__ import annotations

from orchestrator.cli import main

from analysis_db import build_db, grid_specs


def test_figures_command_writes_and_lists_files(tmp_path, capsys):
    url = build_db(tmp_path, grid_specs()[:4] + grid_specs()[-2:], sweep="toy")
    out = tmp_path / "figs"
    rc = main(["figures", "--db", url, "--out", str(out), "--with-paper",
               "--only", "table1_structure_loss,fig3_naive_scaling,fig8_gflops"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    listed = [line.strip() for line in cap.out.splitlines() if line.startswith("  ")]
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == sorted(
        ["fig3_naive_scaling.png", "fig3_naive_scaling.pdf", "fig8_gflops.png", "fig8_gflops.pdf",
         "table1_structure_loss.md", "table1_structure_loss.tex"]
        + [f"{t}.{ext}" for t in ("table1", "table2", "table3", "table4", "table6_split_depth",
                                  "table6_ssl_method", "table8", "table9", "table10", "table11")
           for ext in ("md", "tex")])
    assert all((tmp_path / "figs").joinpath(*p.split("figs/")[-1].split("/")).exists() for p in listed)
    assert cap.out.startswith("6 runs; wrote 26 files")
    assert "warning: fig8_gflops: the paper's Fig. 8 values are not in its text" in cap.err

    # the same database, one sweep, no paper
    rc = main(["figures", "--db", url, "--out", str(tmp_path / "f2"), "--sweep", "toy", "--only", "table2_stc"])
    assert rc == 0 and (tmp_path / "f2" / "table2_stc.md").exists()


def test_figures_command_bad_input_exits_2(tmp_path, capsys):
    url = build_db(tmp_path, grid_specs()[:1])
    assert main(["figures", "--db", url, "--sweep", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no such sweep; known: toy" in capsys.readouterr().err
    assert main(["figures", "--db", url, "--only", "fig99"]) == 2
    assert "unknown names ['fig99']" in capsys.readouterr().err
    assert main(["figures", "--db", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
