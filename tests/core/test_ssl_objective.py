"""The SSL objective on the real tokenizer: teacher, crops through the encoder, EMA, state."""
import pytest
import torch

from core.config import load_config
from core.models.tokenizer import build_tokenizer, tokenizer_args
from core.ssl import SSLObjective
from core.ssl.teacher import teacher_momentum

SMALL_HEAD = {"ssl.out_dim": 32, "ssl.hidden_dim": 32, "ssl.bottleneck_dim": 16, "data.image_size": 32,
              "model.patch_size": 4, "model.latent_size": 4, "train.steps": 10}


def _setup(method="ibot", split_depth=None, **over):
    cfg = load_config(None, {**SMALL_HEAD, "ssl.method": method, "model.split_depth": split_depth, **over})
    torch.manual_seed(0)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    obj = SSLObjective(cfg.ssl, model, cfg.loss.ssl, cfg.train.steps, cfg.train.seed)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return cfg, model, obj, images


@pytest.mark.parametrize("method", ["ibot", "dino", "dinov2"])
@pytest.mark.parametrize("split_depth", [None, 2])  # k = depth (vanilla) and k < depth (staged)
def test_loss_runs_and_only_student_gets_gradients(method, split_depth):
    cfg, model, obj, images = _setup(method, split_depth, **{"ssl.mask_prob": 1.0})
    loss, logs = obj.loss(model, images, None, step=3)
    logs = {k: float(v) for k, v in logs.items()}  # detached tensors: the trainer reads them at log steps
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(cfg.loss.ssl * sum(v for k, v in logs.items()
                                                           if k in ("ssl_cls", "ssl_mim", "ssl_koleo")), rel=1e-5)
    assert ("ssl_mim" in logs) == (method != "dino")
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    enc = model.encoder
    assert enc.cls_token.grad is not None and enc.cls_token.grad.abs().sum() > 0
    if method != "dino":  # masked globals use the learnable mask token
        assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0
    assert obj.heads.cls_head.mlp[0].weight.grad is not None


def test_local_crops_run_through_the_encoder():
    _, model, obj, images = _setup("ibot", 2, **{"ssl.local_crops": 3})
    seen = []
    hook = model.encoder.patch_embed.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    loss, _ = obj.loss(model, images, None, step=0)
    hook.remove()
    assert (8, 3, 32, 32) in seen  # 2 global crops, student
    assert (12, 3, 16, 16) in seen  # 3 local crops of 32·3/7 rounded to a multiple of 2p = 8
    # gradient reaches the encoder through the local crops' class tokens too
    obj_no_local = _setup("ibot", 2, **{"ssl.local_crops": 0})[2]
    assert obj_no_local.crops.local_crops == 0
    assert loss.item() != pytest.approx(obj_no_local.loss(model, images, None, 0)[0].item())


def test_teacher_starts_as_student_and_moves_by_the_ema_rule():
    cfg, model, obj, images = _setup("ibot")
    student = dict(model.encoder.named_parameters())
    for name, p in obj.teacher.encoder.named_parameters():
        assert torch.equal(p, student[name])
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.heads.parameters()), lr=0.5)
    loss, _ = obj.loss(model, images, None, step=4)
    loss.backward()
    opt.step()
    before = {n: p.clone() for n, p in obj.teacher.named_parameters()}
    obj.after_step(model, step=4)
    m = teacher_momentum(4, cfg.train.steps, cfg.ssl.teacher_momentum)
    assert 0.996 < m < 1.0
    moved = 0
    for prefix, mod in (("encoder.", model.encoder), ("heads.", obj.heads)):
        for n, s in mod.named_parameters():
            t_new = dict(obj.teacher.named_parameters())[prefix + n]
            assert torch.allclose(t_new, m * before[prefix + n] + (1 - m) * s, atol=1e-7)
            moved += int(not torch.equal(t_new, before[prefix + n]))
    assert moved > 0


def test_teacher_momentum_cosine_schedule():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_last_layer_frozen_for_the_configured_steps():
    _, model, obj, images = _setup("ibot", **{"ssl.freeze_last_layer_steps": 2})
    v = obj.heads.cls_head.last_layer.parametrizations.weight.original1
    obj.loss(model, images, None, step=1)[0].backward()
    assert v.grad is None
    obj.loss(model, images, None, step=2)[0].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_state_dict_round_trip_reproduces_the_loss():
    _, model, obj, images = _setup("ibot", 2)
    for step in range(2):  # move centres and teacher away from their initial values
        obj.loss(model, images, None, step)[0].backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        obj.after_step(model, step)
    state = obj.state_dict()
    _, _, fresh, _ = _setup("ibot", 2)
    fresh.load_state_dict(state)
    a, logs_a = obj.loss(model, images, None, 2)
    b, logs_b = fresh.loss(model, images, None, 2)
    assert a.item() == b.item() and {k: float(v) for k, v in logs_a.items()} == {k: float(v) for k, v in logs_b.items()}


def test_bad_configs_are_rejected():
    cfg = load_config(None, SMALL_HEAD)  # ssl.method none
    model = build_tokenizer(tokenizer_args(cfg.model, 32))
    with pytest.raises(ValueError, match="ssl.method='none'"):
        SSLObjective(cfg.ssl, model, 0.1, 10)
    cfg = load_config(None, {**SMALL_HEAD, "ssl.method": "ibot"})
    with pytest.raises(ValueError, match="class token"):
        SSLObjective(cfg.ssl, model, 0.1, 10)
