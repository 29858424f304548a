"""`orchestrate report`: a static HTML page from a real (tiny) sweep, checked in a real
headless Chromium over the DevTools protocol: no console errors, every image loads, and a
screenshot is taken.  Skips with the reason when Chromium (Debian: `apt-get install -y
chromium`) or websocket-client is not installed."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.db.store import Store

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1400,1000"]


class Page:
    """One Chromium page driven over the DevTools protocol (websocket-client)."""

    def __init__(self, tmp: Path):
        websocket = pytest.importorskip("websocket", reason="websocket-client is not installed")
        if CHROMIUM is None:
            pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
        profile = tmp / "chromium-profile"
        profile.mkdir()
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, t0 = profile / "DevToolsActivePort", time.time()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() - t0 > 60 or self.proc.poll() is not None:
                self.close()
                pytest.fail(f"chromium did not open its DevTools port (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def open(self, url: str, timeout: float = 60) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        t0 = time.time()
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{url} did not load in {timeout}s")
            self.events.append(json.loads(self.ws.recv()))
        self.call("Runtime.evaluate", expression="1")  # drain events queued before the load event

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads (Log domain) since ``open``."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def images(self) -> list[dict]:
        expr = ("JSON.stringify([...document.images].map(i => ({src: i.getAttribute('src'), "
                "ok: i.complete && i.naturalWidth > 0})))")
        return json.loads(self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"]["value"])

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def page(tmp_path):
    p = Page(tmp_path)
    yield p
    p.close()


def tiny_sweep(tmp_path) -> Path:
    """configs/tiny_cpu.yaml at a few steps: a real tokenizer + generator run (seconds)."""
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    base["data"].update(train_size=256, val_size=64)
    base["train"].update(steps=6, log_every=2, ckpt_every=3)
    base["generator"].update(steps=8, batch_size=32, eval_at=[4], num_samples=32, sample_steps=4)
    doc = {"name": "rep", "base": base, "axes": {"model.patch_size": [8]},
           "stages": {"tokenizer": {}, "generator": {"needs": ["tokenizer"]}},
           "executor": "debug", "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def add_running_run(url: str, tmp_path: Path, finished: str) -> str:
    """A third run whose tokenizer is still training: half of a finished run's log on disk."""
    h = "0123456789abcdef"
    store = Store(url)
    cfg = store.runs(sweep="rep", with_config=True)[0].config
    store.upsert_run(h, "rep", cfg, {"model.patch_size": 2}, executor="slurm", stages=["tokenizer", "generator"])
    store.set_stage_state(h, "tokenizer", "running", attempt=1, slurm_job_id="99_0")
    store.dispose()
    src = tmp_path / "runs" / "rep" / finished
    (tmp_path / "runs" / "rep" / h / "tokenizer").mkdir(parents=True)
    shutil.copy(src / "config.yaml", tmp_path / "runs" / "rep" / h / "config.yaml")
    lines = (src / "tokenizer" / "log.jsonl").read_text().splitlines()
    (tmp_path / "runs" / "rep" / h / "tokenizer" / "log.jsonl").write_text("\n".join(lines[:2]) + "\n")
    return h


def test_report_of_a_real_sweep_loads_in_chromium(tmp_path, page, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assert main(["submit", str(tiny_sweep(tmp_path)), "--db", url]) == 0
    finished = [r.run_hash for r in Store(url).runs(sweep="rep")]
    running = add_running_run(url, tmp_path, finished[0])
    out_dir = tmp_path / "report"
    assert main(["report", "rep", "--db", url, "--out", str(out_dir)]) == 0
    html = (out_dir / "index.html").read_text()

    # status table: every run, the running one with its current step; curves for both
    for h in finished + [running]:
        assert f"run-{h}" in html and (out_dir / "curves" / f"{h}.png").stat().st_size > 1000
    assert "tokenizer: running 4/6" in html and html.count("tokenizer: finished") == 1
    # every registry figure/table the grid supports, with the paper overlay (paper tables)
    assert "fig6_convergence" in html and (out_dir / "figures" / "fig6_convergence.png").exists()
    assert "<caption>Paper " in html and "(paper)" in html  # the paper's tables and its columns beside ours
    assert all(f"curves/{h}.samples.png" in html for h in finished)  # generator samples, copied

    page.open((out_dir / "index.html").resolve().as_uri())
    assert page.errors() == []
    images = page.images()
    assert len(images) >= 2 + 1 + 1  # two runs' curves, a sample grid, at least one figure
    assert [i for i in images if not i["ok"]] == []
    shot = page.screenshot(tmp_path / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_browser_check_sees_a_broken_image(tmp_path, page):
    """The harness itself: a missing image and a console error are reported, not missed."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><img src='missing.png'><script>console.error('boom')</script>"
                   "</body></html>")
    page.open(bad.as_uri())
    assert [i["src"] for i in page.images() if not i["ok"]] == ["missing.png"]
    errors = page.errors()
    assert any("boom" in e for e in errors) and any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)


def test_report_refuses_an_unknown_sweep(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade()
    store.dispose()
    assert main(["report", "nope", "--db", url, "--out", str(tmp_path / "out")]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
