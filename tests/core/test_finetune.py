"""Decoder fine-tuning objective: frozen encoder, phase switches, exact resume (no trainer)."""
import copy

import pytest
import torch

from core.config import load_config
from core.finetune import FinetuneObjective
from core.losses.adversarial import adaptive_weight, generator_loss
from core.models.discriminator import SUBSTITUTE_NAME
from core.models.tokenizer import build_tokenizer, tokenizer_args
from core.trainer.objective import ReconstructionObjective

OVERRIDES = {"data.image_size": 32, "model.patch_size": 4, "model.latent_size": 4, "model.split_depth": 2,
             "loss.perceptual": 0.0, "loss.adversarial": 0.75, "finetune.enabled": True,
             "finetune.disc_image_size": 32, "finetune.disc_start_step": 1, "finetune.adv_start_step": 2}


def _setup(seed=0):
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(seed)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    rec = ReconstructionObjective(cfg.loss)
    obj = FinetuneObjective(cfg.finetune, model, cfg.loss.adversarial, rec, seed=cfg.train.seed)
    obj.rec = rec
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # frozen params included, as in the trainer
    return cfg, model, obj, opt


def _batch(step):
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + step)) * 2 - 1


def _step(model, obj, opt, step):
    """One trainer step: the summed objectives, one backward, the step, after_step hooks."""
    rec, rec_logs = obj.rec.loss(model, _batch(step), None, step)
    adv, logs = obj.loss(model, _batch(step), None, step)
    opt.zero_grad(set_to_none=True)
    (rec + adv).backward()
    opt.step()
    obj.after_step(model, step)
    return rec + adv, _floats({**rec_logs, **logs})


def _floats(logs):
    """Objectives log detached tensors (read by the trainer only at log steps)."""
    return {k: float(v) for k, v in logs.items()}


def test_encoder_frozen_decoder_trains_and_backbone_is_named():
    cfg, model, obj, opt = _setup()
    assert obj.backbone_name == SUBSTITUTE_NAME
    enc0 = copy.deepcopy(model.encoder.state_dict())
    dec0 = copy.deepcopy(model.decoder.state_dict())
    for step in range(3):
        _step(model, obj, opt, step)
    assert all(torch.equal(v, enc0[k]) for k, v in model.encoder.state_dict().items())
    assert any(not torch.equal(v, dec0[k]) for k, v in model.decoder.state_dict().items())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(not p.requires_grad for p in obj.disc.backbone.parameters())


def test_phase_switches_at_configured_steps():
    cfg, model, obj, opt = _setup()
    heads = lambda: [p.detach().clone() for p in obj.disc.heads.parameters()]  # noqa: E731
    h0 = heads()
    loss, logs = _step(model, obj, opt, 0)  # before disc_start (1) and adv_start (2)
    assert "adv_g" not in logs and obj.last_d_loss is None
    assert loss.item() == pytest.approx(logs["l1"])
    assert all(torch.equal(a, b) for a, b in zip(h0, heads()))
    loss, logs = _step(model, obj, opt, 1)  # discriminator trains, no adversarial loss yet
    assert "adv_g" not in logs and obj.last_d_loss is not None
    assert loss.item() == pytest.approx(logs["l1"])
    assert any(not torch.equal(a, b) for a, b in zip(h0, heads()))
    # from adv_start the generator loss enters with the adaptive weight
    images = _batch(2)
    adv, logs = obj.loss(model, images, None, 2)
    logs = _floats(logs)
    assert "adv_g" in logs and "adv_d" in logs
    assert adv.item() == pytest.approx(0.75 * logs["adv_weight"] * logs["adv_g"], rel=1e-5)
    # the weight is the gradient-norm ratio at the decoder's last layer
    with torch.no_grad():
        z = model.encode(images)
    recon = model.decode(z)
    rec = (recon - images).abs().mean()
    g = generator_loss(obj.disc(obj._augment(recon, 2, 10)))
    assert logs["adv_weight"] == pytest.approx(adaptive_weight(rec, g, model.decoder_last_layer).item(), rel=1e-4)


def test_resume_is_exact():
    cfg, model, obj, opt = _setup()
    for step in range(2):
        _step(model, obj, opt, step)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "obj": obj.state_dict()})
    for step in range(2, 4):
        _step(model, obj, opt, step)
    # a fresh process: same config, different init, state loaded from the checkpoint
    _, model2, obj2, opt2 = _setup(seed=1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    obj2.load_state_dict(saved["obj"])
    for step in range(2, 4):
        _step(model2, obj2, opt2, step)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(obj.disc.heads.state_dict().items(), obj2.disc.heads.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_from_another_backbone_is_rejected():
    _, _, obj, _ = _setup()
    state = obj.state_dict()
    state["backbone"] = "dino-vits8"
    with pytest.raises(ValueError, match="finetune.dino_weights"):
        obj.load_state_dict(state)


def test_table7_recipe_in_epochs_is_converted_from_dataset_size_and_global_batch():
    from core.config import finetune_phase
    from core.finetune import resolve_epochs

    phase = finetune_phase(load_config(None, {"data.image_size": 32, "model.patch_size": 4, "model.latent_size": 4}),
                           "/runs/x/tokenizer")
    assert phase.finetune.epochs == 16 and phase.loss.ssl == 0.0 and phase.loss.adversarial == 0.75
    assert (phase.optim.lr, phase.optim.min_lr, phase.optim.weight_decay) == (2e-4, 2e-5, 0.0)
    # ImageNet-1k train split on 8 GPUs: 1,281,167 // 256 = 5004 steps per epoch
    cfg, schedule = resolve_epochs(phase, 1_281_167, world_size=8)
    assert schedule == {"steps_per_epoch": 5004, "global_batch": 256, "epochs": 16, "steps": 16 * 5004,
                        "warmup_steps": 5004, "disc_start_step": 6 * 5004, "adv_start_step": 8 * 5004}
    assert cfg.data.batch_size == 32 and cfg.train.steps == 80064 and cfg.optim.warmup_steps == 5004
    assert (cfg.finetune.disc_start_step, cfg.finetune.adv_start_step) == (30024, 40032)
    # the same global batch on one GPU: the same steps, 256 images per step
    one, _ = resolve_epochs(phase, 1_281_167, world_size=1)
    assert one.data.batch_size == 256 and one.train.steps == 80064
    with pytest.raises(ValueError, match="finetune.batch_size=256"):
        resolve_epochs(phase, 1_281_167, world_size=3)
    with pytest.raises(ValueError, match="only 100 images"):
        resolve_epochs(phase, 100, world_size=1)
    # an explicit finetune.steps selects the step recipe: nothing is converted
    steps = finetune_phase(load_config(None, {"data.image_size": 32, "model.patch_size": 4, "model.latent_size": 4,
                                              "finetune.steps": 7}), "/x")
    assert steps.finetune.epochs is None and resolve_epochs(steps, 1000, 1) == (steps, {})
