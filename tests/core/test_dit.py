"""LightningDiT-style generator: shapes, CFG path, RoPE, adaLN-Zero init, sizes."""
import pytest
import torch

from core.models.dit import DIT_SIZES, DiT, apply_rope, rope_2d


def trained_like(model: DiT) -> DiT:
    # adaLN-Zero makes a fresh model output exactly 0; perturb every weight to test real paths.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_shapes_and_zero_init():
    torch.manual_seed(0)
    model = DiT("micro", latent_channels=16, latent_size=4, num_classes=10)
    x, t, y = torch.randn(3, 16, 4, 4), torch.rand(3), torch.tensor([0, 9, 10])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: zero output at init
    trained_like(model)
    out = model(x, t, y)
    assert out.shape == x.shape and out.abs().mean() > 0
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_patch_size_two_unpatchify_round_trip():
    model = DiT("micro", latent_channels=3, latent_size=8, num_classes=2, patch_size=2)
    x = torch.randn(2, 3, 8, 8)
    # patchify as the final layer would emit it: (B, N, p·p·c) in (p, q, c) order
    tokens = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(model.unpatchify(tokens), x)
    assert trained_like(model)(x, torch.rand(2), torch.tensor([0, 1])).shape == x.shape


def test_cfg_path_matches_manual_guidance():
    torch.manual_seed(0)
    model = trained_like(DiT("micro", latent_channels=8, latent_size=4, num_classes=5)).eval()
    x, t, y = torch.randn(4, 8, 4, 4), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        v_c = model(x, t, y)
        v_u = model(x, t, torch.full_like(y, model.null_class))
        guided = model.forward_cfg(x, t, y, 3.0)
        assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-5)
        assert torch.equal(model.forward_cfg(x, t, y, 1.0), v_c)
        assert not torch.allclose(v_c, v_u)  # the label actually conditions the output
        # a scalar time broadcasts over the batch
        assert torch.allclose(model(x, t[0], y), model(x, t[0].expand(4), y))


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_2d(grid=5, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    # place the same q and k at every position; score(i, j) must depend on (row, col) offsets only
    qs = apply_rope(q.expand(1, 1, 25, 16), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 25, 16), cos, sin)[0, 0]
    s = qs @ ks.T  # (25, 25)
    idx = lambda r, c: 5 * r + c
    assert torch.allclose(s[idx(0, 0), idx(1, 2)], s[idx(2, 1), idx(3, 3)], atol=1e-5)
    assert torch.allclose(s[idx(4, 4), idx(2, 3)], s[idx(2, 1), idx(0, 0)], atol=1e-5)
    assert not torch.allclose(s[idx(0, 0), idx(1, 2)], s[idx(0, 0), idx(2, 1)], atol=1e-3)
    # rotation keeps norms
    assert torch.allclose(qs.norm(dim=-1), q.norm().expand(25), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(4, 18)


def test_xl_matches_dit_xl_parameter_count():
    # DiT-XL/2 on SD-VAE latents (4×32×32, patch 2, 1000 classes): 675M parameters.
    with torch.device("meta"):
        model = DiT("XL", latent_channels=4, latent_size=32, num_classes=1000, patch_size=2)
    assert model.num_params() == pytest.approx(675e6, rel=0.05)
    assert DIT_SIZES["XL"].width == 1152 and DIT_SIZES["XL"].depth == 28 and DIT_SIZES["XL"].heads == 16
    sizes = list(DIT_SIZES)
    with torch.device("meta"):
        counts = [DiT(s, 16, 4, 10).num_params() for s in sizes]
    assert counts == sorted(counts)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="generator.size='huge'"):
        DiT("huge", 16, 4, 10)
    with pytest.raises(ValueError, match="patch_size=3 does not divide latent_size=4"):
        DiT("micro", 16, 4, 10, patch_size=3)
    model = DiT("micro", 16, 4, 10)
    with pytest.raises(ValueError, match=r"expects latents \(B, 16, 4, 4\)"):
        model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.zeros(2, dtype=torch.long))
