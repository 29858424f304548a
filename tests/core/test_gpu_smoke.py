"""benchmarks/gpu_smoke.py runs end to end on a CPU with tiny models, so its GPU paths cannot rot."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


@pytest.mark.slow  # tiny models, but torch.compile tracing and one random Inception pass: ~25 s
def test_gpu_smoke_runs_tiny_on_cpu_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    tok = result["tokenizer"]
    assert tok["eager"]["compiled_blocks"] == 0 and tok["compiled"]["compiled_blocks"] > 0
    for run in (tok["eager"], tok["compiled"]):
        assert run["step_s"] > 0 and run["img_per_s"] > 0 and run["step_flops"] > 0 and run["mfu"] > 0
    assert result["matmul"]["tflops"] > 0 and result["dit"]["step_s"] > 0 and result["dit"]["params"] > 0
    assert result["inception"]["weights"].startswith("random") and result["inception"]["img_per_s"] > 0
