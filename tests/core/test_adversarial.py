"""Adversarial losses, DiffAugment and the DINO-backbone discriminator."""
import pytest
import timm
import torch

from core.losses.adversarial import adaptive_weight, diff_augment, generator_loss, hinge_d_loss
from core.models.discriminator import DINO_NAME, SUBSTITUTE_NAME, Discriminator
from core.ssl.augment import step_generator


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2] -> mean 2.5/3; relu(1 + fake) = [0, 1, 1.5] -> mean 2.5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    assert generator_loss(fake).item() == pytest.approx(1.5 / 3)


def test_adaptive_weight_matches_manual_autograd():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4)
    x = torch.randn(8, 5)
    out = layer(x)
    rec = (out - 1).abs().mean()
    gan = -(out * torch.linspace(-1, 3, 4)).pow(2).mean()
    w = adaptive_weight(rec, gan, layer.weight)
    # manual: gradients of each loss w.r.t. the weight, by an independent path
    g_rec = torch.sign(out.detach() - 1).t() @ x / out.numel()
    coef = torch.linspace(-1, 3, 4)
    g_gan = (-2 * out.detach() * coef ** 2).t() @ x / out.numel()
    assert w.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-6)).item(), rel=1e-5)
    assert not w.requires_grad
    (rec + w * gan).backward()  # graphs were retained for the trainer's backward
    out = layer(x)
    assert adaptive_weight((out - 1).abs().mean(), 1e-12 * out.sum(), layer.weight).item() == pytest.approx(1e4)


def test_diff_augment_translation_and_determinism():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    a = diff_augment(x, step_generator(0, 1))
    assert torch.equal(a, diff_augment(x, step_generator(0, 1)))
    assert not torch.equal(a, diff_augment(x, step_generator(0, 2)))
    assert a.shape == x.shape
    # gradients flow to the input (it is applied to the decoder's output)
    y = x.clone().requires_grad_(True)
    diff_augment(y, step_generator(0, 1)).sum().backward()
    assert y.grad is not None
    # translation only: a constant image keeps its value inside and is zero in the fill
    ones = torch.ones(64, 1, 16, 16)
    shifted = diff_augment(ones, step_generator(0, 3))
    zero_rows = (shifted == 0).all(dim=3).sum(dim=(1, 2))
    assert zero_rows.max() <= 2  # at most 1/8 of 16
    assert (zero_rows > 0).any()


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A timm vit_small_patch8_224 state dict (random init) written the way a user would."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dino") / "dino_vits8.pth"
    torch.save(vit.state_dict(), path)
    return path, vit.state_dict()


def test_discriminator_loads_local_dino_weights_and_backbone_stays_frozen(vit_weights):
    path, state = vit_weights
    disc = Discriminator(path, image_size=32)  # pos-embed resampled 28x28 -> 4x4 for speed
    assert disc.backbone_name == DINO_NAME
    own = disc.backbone.state_dict()
    assert torch.equal(own["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"])
    assert own["pos_embed"].shape == (1, 1 + 16, 384)
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    frozen = {k: v.clone() for k, v in own.items()}
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-2)
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    heads_before = [p.clone() for p in disc.heads.parameters()]
    disc.train()
    loss = hinge_d_loss(disc(real), disc(fake))
    assert disc(real).shape == (4, 5 * 16)
    loss.backward()
    opt.step()
    for k, v in disc.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, disc.heads.parameters()))
    assert not disc.backbone.training


def test_discriminator_at_224_and_errors(vit_weights, tmp_path):
    path, _ = vit_weights
    disc = Discriminator(path)  # the real setting: 224 input, 28x28 tokens per tap
    with torch.no_grad():
        assert disc(torch.zeros(1, 3, 32, 32)).shape == (1, 5 * 784)
    bad = tmp_path / "bad.pth"
    torch.save({"not_a_vit": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        Discriminator(bad, image_size=32)
    with pytest.raises(FileNotFoundError, match="finetune.dino_weights"):
        Discriminator(tmp_path / "missing.pth", image_size=32)
    with pytest.raises(ValueError, match="disc_image_size=30"):
        Discriminator(None, image_size=30)


def test_substitute_backbone_is_named_and_deterministic():
    a, b = Discriminator(None, image_size=32), Discriminator(None, image_size=32)
    assert a.backbone_name == SUBSTITUTE_NAME
    for (k, v), (_, w) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(v, w), k


def test_diffaug_ranks_draw_their_rows_of_the_global_batch():
    from core.seed import BatchRNG

    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = diff_augment(x, step_generator(0, 4, 10))
    for r in range(2):
        assert torch.allclose(diff_augment(x[r::2], BatchRNG(step_generator(0, 4, 10), r, 2)), full[r::2], atol=1e-6)
    same = x[:4]
    assert not torch.allclose(diff_augment(same, BatchRNG(step_generator(0, 4, 10), 0, 2)),
                              diff_augment(same, BatchRNG(step_generator(0, 4, 10), 1, 2)))


def test_adversarial_module_holds_loss_functions_only():
    """No import circle: core.losses.adversarial imports neither the objective nor the trainer."""
    import subprocess
    import sys

    code = ("import sys, core.losses.adversarial; "
            "bad = [m for m in ('core.finetune', 'core.trainer', 'core.trainer.objective') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    import core.losses.adversarial as adv
    from core.finetune import FinetuneObjective, build_objective

    assert not hasattr(adv, "build_objective") and callable(build_objective) and FinetuneObjective
