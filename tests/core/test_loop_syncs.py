"""The training loop never waits for the device outside log steps (issue 20 §2).

On a GPU every host read of a device value (``.item()``, ``bool(t)``, ``.tolist()``, a
boolean-mask index whose size the host must learn, ``nonzero``) stalls the host until the
queue drains.  Here (CPU) the rule is checked as "during a non-log step the host reads no
tensor value at all": a value read from a CPU-built mask or crop parameter is what forced
host-built augmentations and their host-to-device copies before.  Host tensors by design are
not counted: torch.optim's step counters and the DataLoader's (it draws its workers' base
seed from a CPU generator when an iterator starts).
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from core.seed import seed_everything
from core.train import build_trainer
from core.trainer.distributed import DistInfo

aten = torch.ops.aten
# ops whose CUDA kernels copy a value (or a size) back to the host
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
         aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
         aten.repeat_interleave.Tensor}
HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.__bool__,
                torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.cpu}
SSL = {"ssl.method": "ibot", "ssl.out_dim": 64, "ssl.hidden_dim": 64, "ssl.bottleneck_dim": 32, "ssl.local_crops": 1,
       "ssl.mask_prob": 1.0, "model.patch_size": 4, "model.split_depth": 2, "data.hflip": True, "optim.ema": 0.9,
       "train.steps": 8, "train.log_every": 100, "train.ckpt_every": 100}


HOST_SIDE = ("/torch/optim/", "/torch/utils/data/")


def _ours() -> bool:
    """False inside torch.optim and the DataLoader (host tensors by design)."""
    return not any(h in f.filename for f in traceback.extract_stack() for h in HOST_SIDE)


class _Recorder:
    def __init__(self, trainer):
        self.trainer, self.events = trainer, []

    def add(self, what: str) -> None:
        if _ours():
            self.events.append((self.trainer.step, what))


class _Dispatch(TorchDispatchMode):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.rec.add(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
                self.rec.add(f"{func} with a boolean mask")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_METHODS:
            self.rec.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["ibot", "dinov2"])
def test_joint_ssl_step_reads_nothing_back_outside_log_steps(tiny_config, tmp_path, method):
    cfg = tiny_config(**{**SSL, "ssl.method": method})
    seed_everything(cfg.train.seed)
    trainer, _, _ = build_trainer(cfg, tmp_path, DistInfo())
    trainer.run(stop_at_step=2)  # first steps outside the modes (lazy one-time set-up may read)
    rec = _Recorder(trainer)
    with _Function(rec), _Dispatch(rec):
        trainer.run(stop_at_step=6)  # steps 3..6; step 6 logs and checkpoints (may read)
    during_steps = [(s, what) for s, what in rec.events if s < 6]
    assert not during_steps, f"host reads during non-log steps: {during_steps[:12]} ({len(during_steps)} in all)"
    assert any(s == 6 for s, _ in rec.events)  # the recorder sees the log step's reads: it works


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CI machine)")
def test_joint_ssl_loop_runs_under_cuda_sync_debug_mode_error(tiny_config, tmp_path):
    """On a GPU: any synchronising CUDA call in a non-log step raises."""
    cfg = tiny_config(**{**SSL, "train.device": "cuda"})
    seed_everything(cfg.train.seed)
    trainer, _, _ = build_trainer(cfg, tmp_path, DistInfo(device=torch.device("cuda")))
    trainer.run(stop_at_step=2)
    step = trainer.train_step

    def strict(s):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(s)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = strict
    trainer.run(stop_at_step=6)
    assert trainer.step == 6
