"""benchmarks/gpu_smoke.py runs end to end on a CPU with tiny models, so its GPU paths cannot rot."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CI machine)")
def test_init_distributed_sets_the_local_cuda_device(monkeypatch):
    """LOCAL_RANK picks this process's GPU (also when a caller already made the process group)."""
    from core.trainer import distributed as D

    local = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = D.init_distributed("cuda")
    assert info.device == torch.device("cuda", local) and torch.cuda.current_device() == local
