"""A sweep report: one static HTML page (no server, no JavaScript) that opens from disk.

``build_report(store, sweep, out_dir)`` writes ``out_dir/index.html`` with

* the status table: every run, its axis values, per-stage states, the current step of
  stages in flight (as ``orchestrate status --watch`` sees them) and the first error line;
* the measured cost (``<stage>_gpu_hours`` / ``_cpu_hours`` rows, :mod:`orchestrator.cost`);
* every figure and table of :mod:`analysis.registry` with the paper overlay, plus their
  warnings (figures in ``out_dir/figures/``, PNG shown, PDF linked);
* per-run training curves from the run directories' ``log.jsonl`` — tokenizer loss vs step,
  generator loss vs step and gFID / IS vs generator step — read from disk, so runs still
  training are included (``out_dir/curves/<run>.png``).

Every reference in the page is a relative path inside ``out_dir``: the folder can be copied
or served as it is.  ``refresh_s`` adds a meta refresh so an open page follows a sweep when
the report is rebuilt periodically.
"""
from __future__ import annotations

import html
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from core.io import write_atomic
from orchestrator.progress import Watcher, fmt_duration

STAGE_LOGS = ("tokenizer", "finetune", "generator")
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f3f3f3}.finished{color:#1a7f37}.failed{color:#cf222e}.running{color:#9a6700}.queued{color:#0969da}
.cancelled,.preempted,.pending{color:#8250df}.warn{color:#9a6700;font-size:13px}figure{display:inline-block;margin:8px}
img{max-width:640px;border:1px solid #eee}.wide{overflow-x:auto}figcaption{font-size:12px}code{font-size:12px}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def read_log(path: Path) -> list[dict]:
    """Records of a ``log.jsonl``; a torn last line (being written) is skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def curves_png(run_root: Path, path: Path, title: str) -> bool:
    """One PNG per run: loss vs step per stage with a log, gFID / IS vs generator step.
    False when the run has no log yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, evals, backbones = {}, {}, {}
    for stage in STAGE_LOGS:
        recs = read_log(run_root / stage / "log.jsonl")
        pts = [(r["step"], r["loss"]) for r in recs if isinstance(r.get("loss"), (int, float))]
        if pts:
            losses[stage] = pts
        for r in recs:
            ev = r.get("eval")
            if isinstance(ev, dict) and isinstance(ev.get("value"), (int, float)):
                evals.setdefault(ev.get("name"), []).append((r["step"], ev["value"]))
                backbones[ev.get("name")] = ev.get("backbone")
    if not losses and not evals:
        return False
    panels = [("loss", losses)] + [(name, {name: pts}) for name, pts in evals.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (label, series) in zip(axes[0], panels):
        for stage, pts in series.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, label=stage)
        ax.set_xlabel("generator step" if label != "loss" else "step")
        ylabel = {"gfid": "gFID", "inception_score": "IS"}.get(label, label)
        backbone = backbones.get(label)
        ax.set_ylabel(ylabel + (f" [{backbone}]" if backbone and backbone != "inception-v3-compat" else ""))
        if label == "loss" and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # plain numbers, no "+1.5e2" offset
        ax.grid(alpha=0.3)
        if len(series) > 1 or label == "loss":
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def md_table_html(md: str) -> str:
    """A ``analysis.render.write_table`` Markdown file (caption line + pipe table) as HTML."""
    lines = [line for line in md.splitlines() if line.strip()]
    caption = lines[0].strip("*") if lines and not lines[0].startswith("|") else ""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    rows = [r for r in rows if not all(set(c) <= set("-:") for c in r)]  # drop the |---| rule
    if not rows:
        return f"<pre>{_e(md)}</pre>"
    head = "".join(f"<th>{_e(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<div class='wide'><table><caption>{_e(caption)}</caption><tr>{head}</tr>{body}</table></div>"


def _status_section(store, sweep: str, runs_root: Path | None, runs_frame) -> tuple[str, dict]:
    runs = store.runs(sweep=sweep)
    snap = Watcher(store, sweep, runs_root).snapshot()
    steps = {(f.run_hash, f.stage): f for f in snap.in_flight}
    params = {}
    if runs_frame is not None and not runs_frame.empty:
        cfg_cols = [c for c in runs_frame.columns if "." in c and runs_frame[c].astype(str).nunique() > 1]
        params = {r["run_hash"]: ", ".join(f"{c}={r[c]}" for c in cfg_cols) for _, r in runs_frame.iterrows()}
    counts = " · ".join(f"{stage}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
                        for stage, c in snap.counts.items())
    eta = "all stages over" if not snap.active else f"ETA {fmt_duration(snap.eta_s)}"
    rows = []
    for r in runs:
        cells = []
        for st in sorted(r.stages, key=lambda x: x.id):
            f = steps.get((r.run_hash, st.stage))
            status = f.status if f else st.status
            step = f" {f.step}/{f.total or '?'}" if f and f.step is not None else ""
            cells.append(f'<span class="{_e(status)}">{_e(st.stage)}: {_e(status)}{_e(step)}</span>')
        err = (r.error_tail or "").strip().splitlines()
        rows.append(f"<tr><td><a href='#run-{_e(r.run_hash)}'><code>{_e(r.run_hash)}</code></a></td>"
                    f"<td>{_e(params.get(r.run_hash, ''))}</td><td class='{_e(r.status)}'>{_e(r.status)}</td>"
                    f"<td>{' · '.join(cells)}</td><td>{_e(err[0][:120] if err and r.status != 'finished' else '')}"
                    "</td></tr>")
    table = ("<table><tr><th>run</th><th>axes</th><th>status</th><th>stages</th><th>error</th></tr>"
             + "".join(rows) + "</table>")
    return f"<h2>Status</h2><p>{len(runs)} run(s) · {_e(counts)} · {_e(eta)}</p>{table}", params


def _cost_section(runs_frame) -> str:
    if runs_frame is None or runs_frame.empty:
        return ""
    cols = [c for c in runs_frame.columns if c.endswith(("_gpu_hours", "_cpu_hours"))]
    if not cols:
        return ""
    rows = "".join(f"<tr><td>{_e(c.rsplit('_', 2)[0])}</td><td>{_e(c.rsplit('_', 2)[1].upper())}-hours</td>"
                   f"<td>{runs_frame[c].notna().sum()}</td><td>{runs_frame[c].sum():.4g}</td>"
                   f"<td>{_e(', '.join(sorted(set(runs_frame[c + '_backbone'].dropna()))))}</td></tr>" for c in cols)
    return ("<h2>Measured cost</h2><table><tr><th>stage</th><th>unit</th><th>runs</th><th>total</th>"
            f"<th>source</th></tr>{rows}</table>")


def _figures_section(runs_frame, history, out_dir: Path, with_paper: bool, predictions=None) -> tuple[str, list[str]]:
    from analysis.registry import generate

    fig_dir = out_dir / "figures"
    outputs = generate(runs_frame, fig_dir, history, with_paper=with_paper, predictions=predictions)
    parts, warnings = ["<h2>Figures and tables</h2>"], []
    for o in outputs:
        files = sorted(o.files)
        pngs = [f for f in files if f.suffix == ".png"]
        mds = [f for f in files if f.suffix == ".md"]
        if not pngs and not mds:
            warnings += o.warnings
            continue
        parts.append(f"<h3 id='{_e(o.name)}'>{_e(o.name)}</h3>")
        for f in pngs:
            rel = f.relative_to(out_dir).as_posix()
            pdf = f.with_suffix(".pdf")
            link = f" (<a href='{_e(pdf.relative_to(out_dir).as_posix())}'>PDF</a>)" if pdf.exists() else ""
            parts.append(f"<figure><img src='{_e(rel)}' alt='{_e(f.stem)}'><figcaption>{_e(f.stem)}{link}"
                         "</figcaption></figure>")
        for f in mds:
            parts.append(md_table_html(f.read_text()))
        parts += [f"<p class='warn'>{_e(w)}</p>" for w in o.warnings]
    if warnings:
        parts.append("<h3>Not drawn</h3>" + "".join(f"<p class='warn'>{_e(w)}</p>" for w in warnings))
    return "\n".join(parts), warnings


def build_report(store, sweep: str, out_dir: str | Path, with_paper: bool = True, refresh_s: int = 0,
                 runs_root: str | Path | None = None) -> Path:
    """Write the report of ``sweep`` to ``out_dir/index.html`` (see the module docstring)."""
    from orchestrator.commands.figures import load_frames, load_predictions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_frame, history = load_frames(store, sweep=sweep)
    root = Path(runs_root) if runs_root else Watcher(store, sweep).runs_root
    status, params = _status_section(store, sweep, root, runs_frame)
    figures, _ = _figures_section(runs_frame, history, out_dir, with_paper, load_predictions(store, sweep))
    curves = ["<h2>Training curves</h2>"]
    for h in (runs_frame["run_hash"] if not runs_frame.empty else []):
        png = out_dir / "curves" / f"{h}.png"
        title = f"{h} {params.get(h, '')}"
        if root is not None and curves_png(root / h, png, title):
            samples = root / h / "generator" / "samples.png"
            extra = ""
            if samples.is_file():  # copied: the report folder stands on its own
                shutil.copyfile(samples, out_dir / "curves" / f"{h}.samples.png")
                extra = f"<img src='curves/{_e(h)}.samples.png' alt='generator samples of {_e(h)}'>"
            curves.append(f"<div id='run-{_e(h)}'><h3><code>{_e(h)}</code> {_e(params.get(h, ''))}</h3>"
                          f"<img src='curves/{_e(h)}.png' alt='training curves of {_e(h)}'>{extra}</div>")
        else:
            curves.append(f"<div id='run-{_e(h)}'><h3><code>{_e(h)}</code></h3><p class='warn'>no log yet</p></div>")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    meta = f"<meta http-equiv='refresh' content='{int(refresh_s)}'>" if refresh_s > 0 else ""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{meta}"
            f"<title>sweep {_e(sweep)}</title><style>{CSS}</style></head><body>"
            f"<h1>Sweep {_e(sweep)}</h1><p>generated {now} from <code>{_e(_safe_url(store.url))}</code> · "
            "<a href='#figures'>figures</a> · <a href='#curves'>curves</a></p>"
            f"{status}{_cost_section(runs_frame)}<div id='figures'>{figures}</div>"
            f"<div id='curves'>{''.join(curves)}</div></body></html>")
    path = out_dir / "index.html"
    write_atomic(path, page.encode("utf-8"))  # an open browser never reads half a page
    return path


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
