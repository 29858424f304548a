import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.eval.flops import count_flops, tokenizer_flops
from core.models import flops_formulas
from core.models.tokenizer import TCAE, VIT_SIZES, TokenizerArgs, build_tokenizer


def micro(**kw) -> TCAE:
    base = dict(image_size=32, patch_size=4, encoder_size="micro", decoder_size="micro",
                split_depth=None, compression="conv", latent_size=4, latent_channels=16)
    base.update(kw)
    torch.manual_seed(0)
    return build_tokenizer(TokenizerArgs(**base))


@pytest.mark.parametrize(
    "patch,latent,class_token",
    [(4, 4, False), (2, 4, False), (4, 4, True), (8, 8, False), (16, 4, True)],  # merge/equal/split
)
def test_vanilla_tokenizer_matches_closed_form(patch, latent, class_token):
    model = micro(patch_size=patch, latent_size=latent, class_token=class_token)
    assert tokenizer_flops(model, 32) == flops_formulas.tokenizer_flops(model.args, 32)


def test_vit_s_256_on_meta_matches_closed_form():
    with torch.device("meta"):
        model = TCAE(TokenizerArgs(256, 16, "S", "S", None, "conv", 8, 128))
    flops = tokenizer_flops(model, 256)
    assert flops == flops_formulas.tokenizer_flops(model.args, 256)
    assert flops["total"] == flops["encoder"] + flops["decoder"]
    assert 12.0e9 < flops["encoder"] < 12.5e9  # ViT-S/16 on 256 tokens: ~6.2 GMACs


def test_fused_cpu_attention_is_counted():
    model = micro(patch_size=4)
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        with_attention = count_flops(model.encoder, x)
        without = count_flops(model.encoder, x, count_fused_attention=False)
    n, d, depth = 64, VIT_SIZES["micro"].width, VIT_SIZES["micro"].depth
    assert with_attention - without == depth * 4 * n * n * d


@pytest.mark.parametrize("backward", [False, True])
def test_attention_formula_matches_unfused_math_path(backward):
    # The math backend runs plain bmm ops that torch counts itself: an independent reference.
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=backward) for _ in range(3))

    def run():
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()

    fused = count_flops(run)
    with sdpa_kernel(SDPBackend.MATH):
        reference = count_flops(run)
    assert fused == reference == (3 if backward else 1) * 4 * 2 * 3 * 10 * 10 * 8


def test_symmetric_shuffle_tokenizer_has_equal_encoder_and_decoder_flops():
    # shuffle_mlp compression (4d -> d -> d) mirrors its decompression (d -> d -> 4d) in MACs,
    # the bottleneck mirrors the latent MLP and the patch embed the pixel projection.
    for split_depth in (None, 0, 2):
        flops = tokenizer_flops(micro(split_depth=split_depth, compression="shuffle_mlp"), 32)
        assert flops["encoder"] == flops["decoder"]


def test_staged_compression_reduces_encoder_flops():
    encoder = [tokenizer_flops(micro(split_depth=k), 32)["encoder"] for k in (0, 2, None)]
    assert encoder[0] < encoder[1] < encoder[2]


def test_image_size_must_match_model():
    with pytest.raises(ValueError, match="image_size"):
        tokenizer_flops(micro(), 64)
