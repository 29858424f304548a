"""Decoder fine-tuning phase (paper App. A, Table 7; RAE recipe): the adversarial Objective.

The trainer sums this objective with its reconstruction objective (``core.trainer.objective``),
so :meth:`FinetuneObjective.loss` returns only the adversarial term

    [step >= adv_start_step] · λ_adv · w · L_G,     L_G = −mean D(DiffAug(x̂)),
    w = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-6)  at the decoder's last layer (clamped, detached).

L_rec for ``w`` is the reconstruction objective's own loss, evaluated on this objective's
forward of the tokenizer (the trainer's objectives do not share outputs; see the report:
one extra decoder forward/backward per step from ``adv_start_step``).

The encoder is frozen (``requires_grad=False``: its grads stay None, so AdamW neither moves
nor decays it).  The discriminator (frozen ViT backbone + heads, ``core.models.
discriminator``) has its own AdamW here and takes a hinge step on (x, x̂.detach()) in
:meth:`after_step` from ``disc_start_step`` on, after the generator step of the same batch
(taming/RAE order).  Heads, spectral-norm vectors and optimizer state are in
:meth:`state_dict`; DiffAug draws from ``(seed, step)``, so resume is exact.

Data parallel: the discriminator's gradients are averaged over ranks before its step
(its weights and AdamW state stay identical on every rank, so rank 0's checkpoint resumes
every rank exactly), the adaptive weight uses the rank-averaged last-layer gradients, and
DiffAug draws this rank's rows of the global batch (:class:`core.seed.BatchRNG`).
Remaining difference to one process: the heads' BatchNorm uses per-rank batch statistics.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from core.losses.adversarial import adaptive_weight, diff_augment, generator_loss, hinge_d_loss
from core.models.discriminator import Discriminator
from core.seed import BatchRNG, step_generator
from core.ssl.objective import unwrap
from core.trainer import distributed as D

if TYPE_CHECKING:
    from core.config import FinetuneConfig, RunConfig

_FAKE_G, _REAL_D, _FAKE_D = 10, 11, 12  # DiffAug generator streams


def freeze_encoder(model: nn.Module) -> None:
    unwrap(model).encoder.requires_grad_(False)


class _Capture(nn.Module):
    """Runs the tokenizer and keeps its output, so the reconstruction objective's loss can be
    evaluated on exactly the x̂ the discriminator sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.out = model, None

    def forward(self, images):
        self.out = self.model(images)
        return self.out


class FinetuneObjective:
    """Adversarial term of the fine-tuning phase (``finetune.enabled: true``).

    Parameters
    ----------
    cfg : the ``finetune`` section (dino_weights, disc_image_size, disc_lr, start steps, diffaug).
    model : the tokenizer; its encoder is frozen here.
    adv_weight : λ_adv (``loss.adversarial``, 0.75 in the paper).
    reconstruction : an Objective whose ``loss(model, images, labels, step)`` is L_rec
        (the trainer's ``ReconstructionObjective``), used for the adaptive weight.
    seed : training seed (DiffAug randomness is a function of (seed, step, global image index)).
    dist_info : data parallelism (None: one process).
    """

    def __init__(self, cfg: "FinetuneConfig", model: nn.Module, adv_weight: float, reconstruction,
                 seed: int = 0, dist_info: D.DistInfo | None = None):
        tok = unwrap(model)
        freeze_encoder(tok)
        self.cfg, self.adv_weight, self.reconstruction, self.seed = cfg, adv_weight, reconstruction, seed
        self.info = dist_info or D.DistInfo(device=tok.decoder_last_layer.device)
        self.disc = Discriminator(cfg.dino_weights, cfg.disc_image_size).to(tok.decoder_last_layer.device)
        self.opt = torch.optim.AdamW(self.disc.heads.parameters(), lr=cfg.disc_lr, betas=(0.9, 0.95),
                                     weight_decay=0.0)
        # D's gradients averaged over ranks during its backward (every head is used on every rank)
        self.disc_sync = D.GradientSync(list(self.disc.heads.parameters()), self.info) if self.info.enabled else None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_d_loss: torch.Tensor | None = None  # hinge loss of the latest D step, logged next step

    @property
    def backbone_name(self) -> str:
        return self.disc.backbone_name

    def _augment(self, x: torch.Tensor, step: int, stream: int) -> torch.Tensor:
        if not self.cfg.diffaug:
            return x
        return diff_augment(x, BatchRNG(step_generator(self.seed, step, stream), self.info.rank, self.info.world_size))

    def _rank_mean(self, t: torch.Tensor) -> torch.Tensor:
        return D.mean_tensor(t, self.info)

    # ------------------------------------------------------------------ Objective protocol

    def modules(self) -> dict[str, nn.Module]:
        return {}  # the discriminator has its own optimizer

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, step: int):
        tok = unwrap(model)
        zero = torch.zeros((), device=images.device)
        generator_on = step >= self.cfg.adv_start_step and self.adv_weight > 0
        disc_on = step >= self.cfg.disc_start_step
        logs = {"adv_d": self.last_d_loss} if self.last_d_loss is not None else {}
        self._batch = None
        if not (generator_on or disc_on):
            return zero, logs
        if not generator_on:  # discriminator phase only: x̂ without a graph
            with torch.no_grad():
                recon = tok(images)[0].float()
            self._batch = (images.detach(), recon)
            return zero, logs
        capture = _Capture(tok)
        rec, _ = self.reconstruction.loss(capture, images, labels, step)
        recon = capture.out[0].float()
        self.disc.heads.requires_grad_(False)  # G step: gradients only into the decoder
        g_loss = generator_loss(self.disc(self._augment(recon, step, _FAKE_G)))
        self.disc.heads.requires_grad_(True)
        w = adaptive_weight(rec, g_loss, tok.decoder_last_layer, average=self._rank_mean)
        if disc_on:
            self._batch = (images.detach(), recon.detach())
        logs.update(adv_g=g_loss.detach(), adv_weight=w)
        return self.adv_weight * w * g_loss, logs

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hinge step of the discriminator heads on the batch of this step (from disc_start_step)."""
        if self._batch is None:
            return
        real, fake = self._batch
        self._batch = None
        self.disc.train()
        d_loss = hinge_d_loss(self.disc(self._augment(real, step, _REAL_D)),
                              self.disc(self._augment(fake, step, _FAKE_D)))
        self.opt.zero_grad(set_to_none=True)
        if self.disc_sync is not None:
            self.disc_sync.start()
        d_loss.backward()
        if self.disc_sync is not None:
            self.disc_sync.finish()  # identical D (weights and AdamW state) on every rank
        self.opt.step()
        self.last_d_loss = self._rank_mean(d_loss.detach())  # the same on every rank (it is checkpointed)

    def state_dict(self) -> dict:
        last = None if self.last_d_loss is None else float(self.last_d_loss)  # checkpoint time: a sync is fine
        return {"disc_heads": self.disc.heads.state_dict(), "disc_opt": self.opt.state_dict(),
                "backbone": self.disc.backbone_name, "last_d_loss": last}

    def load_state_dict(self, state: dict) -> None:
        if state.get("backbone") != self.disc.backbone_name:
            raise ValueError(f"checkpoint discriminator backbone {state.get('backbone')!r} differs from "
                             f"this run's {self.disc.backbone_name!r} (finetune.dino_weights)")
        self.disc.heads.load_state_dict(state["disc_heads"])
        self.opt.load_state_dict(state["disc_opt"])
        self.last_d_loss = state.get("last_d_loss")


def build_objective(cfg: "RunConfig", model: nn.Module, reconstruction,
                    dist_info: D.DistInfo | None = None) -> FinetuneObjective:
    """The fine-tuning phase's adversarial Objective from a run config.

    ``reconstruction`` is the trainer's reconstruction objective (used for the adaptive
    weight; :func:`core.trainer.build.build_objectives` passes its own, so this module
    never imports the trainer's objectives back).
    """
    return FinetuneObjective(cfg.finetune, model, cfg.loss.adversarial, reconstruction, seed=cfg.train.seed,
                             dist_info=dist_info)


def resolve_epochs(cfg: "RunConfig", num_train: int, world_size: int) -> tuple["RunConfig", dict]:
    """The fine-tuning run's config with the paper's epoch recipe turned into steps.

    With ``finetune.epochs`` set (the default: Table 7's 16 epochs, 1 warm-up epoch,
    discriminator from epoch 6, adversarial loss from epoch 8, global batch 256), one epoch
    is ``num_train // global_batch`` steps (the sampler drops the incomplete tail) and
    ``data.batch_size`` becomes the per-rank share of ``finetune.batch_size``.  Returns
    ``(config, schedule)``; with ``finetune.epochs: null`` the config is returned unchanged.

    Raises
    ------
    ValueError naming the key, when the global batch does not split over the ranks or the
    dataset holds less than one global batch.
    """
    ft = cfg.finetune
    if not ft.enabled or ft.epochs is None:
        return cfg, {}
    global_batch = ft.batch_size or cfg.data.batch_size * world_size
    if global_batch % world_size:
        raise ValueError(f"finetune.batch_size={global_batch} (global) does not split over {world_size} ranks")
    steps_per_epoch = num_train // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"finetune.batch_size={global_batch}: the training split has only {num_train} images")
    to_steps = lambda epochs: int(round(epochs * steps_per_epoch))  # noqa: E731
    schedule = {"steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "epochs": ft.epochs,
                "steps": max(1, to_steps(ft.epochs)), "warmup_steps": to_steps(ft.warmup_epochs),
                "disc_start_step": to_steps(ft.disc_start_epoch), "adv_start_step": to_steps(ft.adv_start_epoch)}
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"batch_size": global_batch // world_size}),
        "train": cfg.train.model_copy(update={"steps": schedule["steps"]}),
        "optim": cfg.optim.model_copy(update={"warmup_steps": schedule["warmup_steps"]}),
        "finetune": ft.model_copy(update={"disc_start_step": schedule["disc_start_step"],
                                          "adv_start_step": schedule["adv_start_step"]}),
    })
    return cfg, schedule
