"""Tokenizer training: loop, objectives, checkpoints, schedule, EMA, data parallelism."""
from core.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from core.trainer.distributed import DistInfo, init_distributed
from core.trainer.ema import EMA
from core.trainer.loop import Trainer, train_step
from core.trainer.objective import Objective, ReconstructionObjective, build_objectives
from core.trainer.optim import build_optimizer
from core.trainer.schedule import cosine_lr

__all__ = [
    "Trainer", "train_step", "Objective", "ReconstructionObjective", "build_objectives", "build_optimizer",
    "cosine_lr", "EMA", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "DistInfo", "init_distributed",
]
