import itertools

import pytest
import torch

from core.config import load_config
from core.models.tokenizer import (
    TCAE,
    VIT_SIZES,
    TokenizerArgs,
    ViTSize,
    build_tokenizer,
    decoder_split,
    tokenizer_args,
)


def tiny(**kw) -> TCAE:
    base = dict(image_size=32, patch_size=4, encoder_size="micro", decoder_size="micro",
                split_depth=2, compression="conv", latent_size=4, latent_channels=8)
    base.update(kw)
    torch.manual_seed(0)
    return build_tokenizer(TokenizerArgs(**base))


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "patch,k,c", list(itertools.product([64, 32, 16, 8], [0, 3, 6, 9, 12], [128, 256]))
)
def test_paper_grid_builds_and_round_trips(patch, k, c, monkeypatch):
    # Paper grid at 256 px. Geometry depends on depth, not width: a narrow depth-12 size
    # (ViT-S depth) runs real tensors fast; ViT-S itself is checked on meta below.
    monkeypatch.setitem(VIT_SIZES, "narrow12", ViTSize(width=16, depth=12, heads=2))
    torch.manual_seed(0)
    model = TCAE(TokenizerArgs(256, patch, "narrow12", "narrow12", k, "conv", 8, c))
    with torch.no_grad():
        x_hat, z = model(torch.randn(1, 3, 256, 256))
    assert z.shape == (1, c, 8, 8)
    assert x_hat.shape == (1, 3, 256, 256)
    assert len(model.encoder.blocks1) == k and len(model.encoder.blocks2) == 12 - k
    assert len(model.decoder.blocks2) == k  # equal depths: the decoder mirrors k exactly
    assert isinstance(model.encoder.compress, torch.nn.Identity) == (k == 12)


@pytest.mark.parametrize("patch,k", [(64, 0), (32, 12), (16, 3), (8, 9)])
def test_paper_grid_vit_s_on_meta(patch, k):
    with torch.device("meta"):
        model = TCAE(TokenizerArgs(256, patch, "S", "S", k, "shuffle_mlp", 8, 128))
        x_hat, z = model(torch.empty(1, 3, 256, 256))
    assert z.shape == (1, 128, 8, 8) and x_hat.shape == (1, 3, 256, 256)


def test_real_vit_s_round_trip():
    torch.manual_seed(0)
    model = build_tokenizer(TokenizerArgs(256, 32, "S", "S", 6, "conv", 8, 128))
    with torch.no_grad():
        x_hat, z = model(torch.randn(1, 3, 256, 256))
    assert z.shape == (1, 128, 8, 8) and x_hat.shape == (1, 3, 256, 256)
    assert torch.isfinite(x_hat).all()


@pytest.mark.parametrize(
    "kw,tokens,kind",
    [
        (dict(patch_size=2, split_depth=2, latent_size=4), 8, "merge"),  # 16 -> 8 tokens, merge r=2
        (dict(patch_size=4, split_depth=None, latent_size=4), 8, "merge"),  # vanilla 8 -> 4
        (dict(patch_size=4, split_depth=2, latent_size=4), 4, "equal"),
        (dict(patch_size=8, split_depth=None, latent_size=4), 4, "equal"),
        (dict(patch_size=8, split_depth=0, latent_size=8), 2, "split"),  # 4 -> 2 tokens, split r=4
        (dict(patch_size=16, split_depth=None, latent_size=4), 2, "split"),
    ],
)
@pytest.mark.parametrize("compression", ["conv", "shuffle_mlp"])
def test_bottleneck_cases_shapes(kw, tokens, kind, compression):
    model = tiny(compression=compression, **kw)
    x = torch.randn(2, 3, 32, 32)
    x_hat, z = model(x)
    h = kw["latent_size"]
    assert z.shape == (2, *model.latent_shape) == (2, 8, h, h)
    assert x_hat.shape == x.shape
    out = model.forward_tokens(x)
    assert out.grid == (tokens, tokens) and out.tokens.shape == (2, tokens * tokens, 48)
    bottleneck = model.encoder.bottleneck
    assert (bottleneck.merge, bottleneck.split) == {
        "merge": (tokens // h, 1), "equal": (1, 1), "split": (1, h // tokens)
    }[kind]
    # the latent is exactly the bottleneck of the returned pre-bottleneck tokens
    grid = out.tokens.reshape(2, tokens, tokens, 48)
    torch.testing.assert_close(bottleneck(grid), z)
    assert torch.equal(model.decode(z), x_hat)


def test_decoder_split_rounding_and_asymmetric_sizes():
    assert [decoder_split(k, 12, 12) for k in (0, 3, 12)] == [0, 3, 12]
    assert decoder_split(6, 12, 24) == 12
    assert decoder_split(3, 12, 6) == 2  # 1.5 rounds half up
    assert decoder_split(1, 4, 6) == 2  # 1.5
    model = tiny(encoder_size="micro", decoder_size="mini", split_depth=1)
    assert len(model.decoder.blocks2) == 2 and len(model.decoder.blocks1) == VIT_SIZES["mini"].depth - 2
    x_hat, z = model(torch.randn(1, 3, 32, 32))
    assert x_hat.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(patch_size=5), "patch_size"),
        (dict(split_depth=5), "split_depth"),  # micro depth is 4
        (dict(split_depth=-1), "split_depth"),
        (dict(image_size=24, patch_size=8, split_depth=1, latent_size=1), "split_depth"),  # odd 3x3 grid
        (dict(latent_size=3), "latent_size"),
        (dict(encoder_size="XL"), "encoder_size"),
        (dict(decoder_size="XL"), "decoder_size"),
        (dict(compression="pool"), "compression"),
        (dict(latent_channels=0), "latent_channels"),
    ],
)
def test_invalid_geometry_raises_naming_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kw)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="divisible by 8"):
        model.forward_tokens(torch.randn(1, 3, 28, 28))  # 28 % 4 == 0 but compression needs 8
    with pytest.raises(ValueError, match="mask"):
        model.forward_tokens(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 4, 4, dtype=torch.bool))


def test_tokenizer_args_from_model_config():
    cfg = load_config(overrides={"model.split_depth": 2, "model.compression": "shuffle_mlp",
                                 "ssl.method": "ibot"})
    args = tokenizer_args(cfg.model, cfg.data.image_size)
    assert args == TokenizerArgs(32, 4, "micro", "micro", 2, "shuffle_mlp", 4, 16, True)
    model = build_tokenizer(args)
    assert model.encode(torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)


# ----------------------------------------------------------------------------- tokens, SSL


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("compression", ["conv", "shuffle_mlp"])
def test_forward_tokens_local_crop_and_class_token(class_token, compression):
    model = tiny(class_token=class_token, compression=compression)
    out = model.forward_tokens(torch.randn(3, 3, 16, 16))  # local crop: 4x4 patches, pos-embed resized
    assert out.grid == (2, 2) and out.tokens.shape == (3, 4, 48)
    if class_token:
        assert out.cls.shape == (3, 48)
    else:
        assert out.cls is None and model.encoder.cls_token is None
    # a global crop of the configured size uses the stored position embedding unchanged
    assert model.encoder.pos_embed_for(8, 8) is model.encoder.pos_embed
    assert model.encoder.pos_embed_for(4, 4).shape == (1, 4, 4, 48)


def test_class_token_changes_tokens_but_not_bottleneck_shape():
    with_cls, without = tiny(class_token=True), tiny(class_token=False)
    x = torch.randn(2, 3, 32, 32)
    assert with_cls.encode(x).shape == without.encode(x).shape == (2, 8, 4, 4)


@pytest.mark.parametrize("split_depth", [None, 0, 2])
def test_mask_token_replaces_only_masked_patches(split_depth):
    model = tiny(split_depth=split_depth, class_token=True).eval()
    x1 = torch.randn(2, 3, 32, 32)
    x2 = x1.clone()
    x2[:, :, :4, :8] = torch.randn(2, 3, 4, 8)  # patches (0, 0) and (0, 1) differ
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 0, :2] = True
    with torch.no_grad():
        a, b = model.forward_tokens(x1, mask), model.forward_tokens(x2, mask)
        plain = model.forward_tokens(x1)
        flat = model.forward_tokens(x1, mask.reshape(2, 64))
    # masked content is invisible: identical outputs even though the inputs differ there
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=0)
    assert not torch.allclose(a.tokens, plain.tokens)
    torch.testing.assert_close(flat.tokens, a.tokens)
    # the mask token is what the masked positions see: changing it changes the output
    with torch.no_grad():
        model.encoder.mask_token.add_(1.0)
        c = model.forward_tokens(x1, mask)
    assert not torch.allclose(c.tokens, a.tokens)


def test_probe_features():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    pooled_tokens, pooled_latent = model.probe_features(x)
    torch.testing.assert_close(pooled_tokens, model.forward_tokens(x).tokens.mean(1))
    torch.testing.assert_close(pooled_latent, model.encode(x).mean(dim=(2, 3)))
    assert pooled_tokens.shape == (3, 48) and pooled_latent.shape == (3, 8)


# ----------------------------------------------------------------------------- training contract


@pytest.mark.parametrize("compression", ["conv", "shuffle_mlp"])
def test_gradients_reach_every_parameter(compression):
    model = tiny(class_token=True, compression=compression)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.5
    x_hat, _ = model(x)
    out = model.forward_tokens(x, mask)
    local = model.forward_tokens(x[:, :, :16, :16])
    loss = (x_hat - x).abs().mean() + out.cls.square().mean() + out.tokens.square().mean()
    loss = loss + local.tokens.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_encoder_owns_tokens_and_decoder_last_layer():
    model = tiny(class_token=True)
    enc = {n for n, _ in model.encoder.named_parameters()}
    assert {"pos_embed", "mask_token", "cls_token"} <= enc
    assert any(model.decoder_last_layer is p for p in model.decoder.parameters())
    assert model.decoder_last_layer.shape == (3 * 4 * 4, 48)
    counts = model.num_params()
    assert counts["encoder"] + counts["decoder"] == sum(p.numel() for p in model.parameters())


def test_init_is_deterministic_under_seed():
    a, b = tiny(), tiny()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    torch.manual_seed(1)
    c = build_tokenizer(a.args)
    assert not torch.equal(a.encoder.pos_embed, c.encoder.pos_embed)
    std = a.encoder.blocks1[0].attn.qkv.weight.std().item()
    assert 0.015 < std < 0.025  # trunc_normal(0.02)
