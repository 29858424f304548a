"""benchmarks/gpu_smoke.py runs end to end on a CPU with tiny models, so its GPU paths cannot rot."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


@pytest.mark.slow  # tiny models, but torch.compile tracing, the real loop and one random Inception pass: ~60 s
def test_gpu_smoke_runs_tiny_on_cpu_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    stages = {row["stage"]: row for row in result["stages"]}
    assert set(stages) == {"tokenizer_l1", "tokenizer_l1_compiled", "tokenizer_joint", "tokenizer_joint_loop",
                           "generator", "generator_sampling_bf16"}
    for row in stages.values():  # the fields the cost model reads (documented in the script's docstring)
        assert row["step_s"] > 0 and row["img_per_s"] > 0 and row["flops_per_step"] > 0 and row["mfu"] > 0, row
    assert not stages["tokenizer_l1"]["compiled"] and stages["tokenizer_l1_compiled"]["compiled_modules"]
    joint, loop = stages["tokenizer_joint"], stages["tokenizer_joint_loop"]
    assert joint["flops_per_step"] > stages["tokenizer_l1"]["flops_per_step"]  # + perceptual + iBOT
    assert loop["ratio"] == loop["step_s"] / joint["step_s"] and loop["cpu_s_per_step"] > 0
    assert loop["gpu_util"] is None  # no GPU here
    assert stages["generator_sampling_bf16"]["sample_steps"] >= 1
    assert result["matmul"]["tflops"] > 0 and result["compiled_speedup"] > 0
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
