"""The objectives a run's config asks for (apart from :mod:`core.trainer.objective`, so that the
objectives it assembles — SSL, fine-tuning — may use the trainer package without a circle)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from core.finetune import build_objective as build_adversarial
from core.ssl import SSLObjective
from core.trainer.objective import Objective, ReconstructionObjective

if TYPE_CHECKING:
    from core.config import RunConfig
    from core.trainer.distributed import DistInfo


def build_objectives(cfg: "RunConfig", model: nn.Module, device: torch.device | str,
                     dist_info: "DistInfo | None" = None) -> list[Objective]:
    """The objectives a run's config asks for: reconstruction, plus SSL when ``ssl.method != none``,
    plus the decoder fine-tuning objective (adversarial) when ``finetune.enabled``.

    ``dist_info`` (data parallelism) gives the objectives with random augmentations this
    rank's share of the global batch's random numbers; None = one process.
    """
    objectives: list[Objective] = [ReconstructionObjective(cfg.loss, device)]
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    if cfg.ssl.method != "none" and cfg.loss.ssl > 0:
        objectives.append(SSLObjective(cfg.ssl, model, weight=cfg.loss.ssl, total_steps=cfg.train.steps,
                                       seed=cfg.train.seed, rank=rank, world_size=world))
    if cfg.finetune.enabled:
        # Shares the reconstruction objective (and its LPIPS) for the adaptive GAN weight.
        objectives.append(build_adversarial(cfg, model, reconstruction=objectives[0], dist_info=dist_info))
    for obj in objectives:
        if not isinstance(obj, Objective):
            raise TypeError(f"{type(obj).__name__} does not implement the trainer Objective protocol")
    return objectives
