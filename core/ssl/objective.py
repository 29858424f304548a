"""The joint self-supervised objective (paper Sec. 3.4, Eq. 4-5) as a trainer Objective.

Per step, from the same image batch the reconstruction objective sees:

1. multi-crop (:class:`core.ssl.augment.MultiCrop`): 2 global crops at the image size and
   ``ssl.local_crops`` local crops, all random numbers from ``(train seed, step)`` and this
   rank's rows of the global batch (:class:`core.seed.BatchRNG`: ranks crop differently, the
   global batch is cropped as one process would crop it);
2. block masks on the global crops' patch grid (iBOT/DINOv2; none for DINO);
3. teacher (EMA encoder + heads, no grad): class and patch outputs of the 2 unmasked globals;
4. student (the tokenizer's encoder through ``model.forward_tokens``): masked globals, and
   local crops (positional embedding interpolated by the encoder);
5. loss = ``loss.ssl`` · (L_cls + L_mim [+ KoLeo]), returned to the trainer, which adds it
   to the reconstruction loss; the teacher takes its EMA step in :meth:`after_step`.

Staged compression: the output token grid is T/2 while masks live on the T×T patch grid;
a compressed token is a MIM target when any of its 2×2 children was masked
(:func:`core.ssl.masking.pool_mask`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from core.seed import BatchRNG, step_generator
from core.ssl.augment import MultiCrop, local_crop_size
from core.ssl.dino import DINOLoss
from core.ssl.dinov2 import DINOv2Loss
from core.ssl.heads import SSLHeads
from core.ssl.ibot import iBOTLoss
from core.ssl.masking import block_masks, pool_mask
from core.ssl.teacher import EMATeacher, teacher_momentum

if TYPE_CHECKING:
    from core.config import SSLConfig

LOSSES = {"ibot": iBOTLoss, "dino": DINOLoss, "dinov2": DINOv2Loss}
_MASK_STREAM = 1  # generator stream of the masks (crops use stream 0)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare tokenizer inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def _encoder_tokens(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """(cls (B, d), tokens (B, N', d), grid) from an Encoder (the teacher's copy)."""
    cls, grid = encoder.tokens(x, mask)
    B, gh, gw, d = grid.shape
    return cls[:, 0], grid.reshape(B, gh * gw, d), (gh, gw)


class SSLObjective:
    """iBOT / DINO / DINOv2-style objective; plugs into the trainer's Objective protocol.

    Parameters
    ----------
    cfg : the ``ssl`` config section (``method`` must not be ``none``).
    model : the tokenizer (TCAE, class token enabled); the teacher copies its encoder.
    weight : λ_ssl (``loss.ssl``), applied inside :meth:`loss`.
    total_steps : run length, for the teacher momentum's cosine schedule.
    seed : training seed; crops and masks of step s depend only on (seed, s, global image index).
    rank, world_size : this process's place in data parallelism (rank r holds images
        r, r + W, ... of the global batch, as :class:`core.data.DeterministicBatchSampler`).
    """

    def __init__(self, cfg: "SSLConfig", model: nn.Module, weight: float, total_steps: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if cfg.method not in LOSSES:
            raise ValueError(f"ssl.method={cfg.method!r} has no objective; choose from {sorted(LOSSES)}")
        tok = unwrap(model)
        enc = tok.encoder
        if enc.cls_token is None:
            raise ValueError("SSL needs the encoder's class token (model.class_token: true)")
        self.cfg, self.weight, self.total_steps, self.seed = cfg, weight, total_steps, seed
        self.rank, self.world_size = rank, world_size
        self.loss_fn = LOSSES[cfg.method](
            out_dim=cfg.out_dim, patch_out_dim=cfg.patch_out_dim or cfg.out_dim,
            student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp=cfg.warmup_teacher_temp, warmup_teacher_temp_steps=cfg.warmup_teacher_temp_steps,
            center_momentum=cfg.center_momentum, koleo=cfg.koleo,
        )
        width = enc.pos_embed.shape[-1]
        self.heads = SSLHeads(width, cfg.out_dim, cfg.patch_out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                              use_patch=self.loss_fn.uses_patches)
        device = enc.pos_embed.device
        self.heads.to(device)
        self.loss_fn.to(device)
        self.teacher = EMATeacher(enc, self.heads)
        stride = enc.patch_size * (2 if enc.compressed else 1)  # input side must divide by this
        image_size = enc.grid * enc.patch_size
        self.patch_size = enc.patch_size
        self.crops = MultiCrop(image_size, local_crop_size(image_size, stride, cfg.local_crop_size),
                               cfg.local_crops, cfg.global_crop_scale, cfg.local_crop_scale)

    # ------------------------------------------------------------------ Objective protocol

    def modules(self) -> dict[str, nn.Module]:
        return {"ssl_heads": self.heads}

    def _rng(self, step: int, stream: int = 0, device: torch.device | str = "cpu") -> BatchRNG:
        """This rank's rows of step ``step``'s draws, from a generator on ``device``."""
        return BatchRNG(step_generator(self.seed, step, stream, device), self.rank, self.world_size)

    def masks(self, batch: int, grid: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's block masks (batch, grid, grid) of step ``step``, drawn on ``device``."""
        return block_masks(batch, grid, self._rng(step, _MASK_STREAM, device), self.cfg.mask_prob,
                           tuple(self.cfg.mask_ratio))

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, step: int):
        """λ_ssl·(L_cls + L_mim [+ KoLeo]) for one batch (B, 3, H, W) in [-1, 1].

        Logs are detached tensors.  Crops and masks are drawn on the images' device, and no
        shape depends on a drawn value (the patch head runs on every token, the loss weighs the
        masked ones, as iBOT's reference does): nothing here waits for the device.
        """
        B = images.shape[0]
        globals_, locals_ = self.crops(images, self._rng(step, device=images.device))  # (2B,3,S,S), (L·B,3,s,s)
        masks = None
        if self.loss_fn.uses_masks:
            masks = self.masks(2 * B, globals_.shape[-1] // self.patch_size, step, images.device)  # (2B, T, T)
        freeze_last = step < self.cfg.freeze_last_layer_steps

        with torch.no_grad():
            t_cls, t_tok, _ = _encoder_tokens(self.teacher.encoder, globals_)
            t_cls_logits = self.teacher.heads.forward_cls(t_cls)
            t_patch = self.teacher.heads.forward_patch(t_tok) if self.loss_fn.uses_patches else None

        s_glob = model.forward_tokens(globals_, mask=masks)
        s_cls = [s_glob.cls]
        if locals_ is not None:
            s_cls.append(model.forward_tokens(locals_).cls)
        s_cls_logits = self.heads.forward_cls(torch.cat(s_cls), freeze_last)
        extra = {}
        if self.loss_fn.uses_patches:
            extra = dict(
                student_patch=self.heads.forward_patch(s_glob.tokens, freeze_last),  # (2B, N', K)
                teacher_patch=t_patch,
                masks=pool_mask(masks, s_glob.grid),  # (2B, N')
                student_cls_features=s_glob.cls,
            )
        parts = self.loss_fn(student_cls=s_cls_logits, teacher_cls=t_cls_logits, step=step, **extra)
        ssl = sum(parts.values())
        logs = {f"ssl_{k}": v.detach() for k, v in parts.items()}
        logs["ssl_teacher_temp"] = self.loss_fn.teacher_temp(step)
        if masks is not None:
            logs["ssl_mask_ratio"] = masks.float().mean()
        return self.weight * ssl, logs

    def after_step(self, model: nn.Module, step: int) -> None:
        """EMA step of the teacher with the momentum of ``step``."""
        m = teacher_momentum(step, self.total_steps, self.cfg.teacher_momentum)
        self.teacher.update(unwrap(model).encoder, self.heads, m)

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "teacher": self.teacher.state_dict(),
                "loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.load_state_dict(state["loss"])
