"""Training: the one loop, objectives, checkpoints, schedule, EMA, data parallelism.

(:func:`core.trainer.build.build_objectives` is imported from its module: it pulls in the
SSL and fine-tuning objectives, which use this package.)"""
from core.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from core.trainer.distributed import DistInfo, init_distributed
from core.trainer.ema import EMA
from core.trainer.loop import Trainer, train_step
from core.trainer.objective import Objective, ReconstructionObjective
from core.trainer.optim import build_optimizer
from core.trainer.schedule import cosine_lr

__all__ = [
    "Trainer", "train_step", "Objective", "ReconstructionObjective", "build_optimizer",
    "cosine_lr", "EMA", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "DistInfo", "init_distributed",
]
