"""Under bf16 autocast every arm of the split-depth axis computes in the same precision.

The residual stream (tokenizer encoder and decoder, DiT) stays float32 whatever the split
depth; the pixel projection, the DiT's velocity and the SSL heads' logits come out float32.
Checked with forward hooks under CPU bf16 autocast (the same autocast rules as on CUDA).
"""
import pytest
import torch
from timm.models.vision_transformer import Block

from core.models.dit import DiT, DiTBlock
from core.models.tokenizer import TokenizerArgs, build_tokenizer
from core.ssl.heads import SSLHeads


def _block_input_dtypes(model, block_type, run) -> dict[str, torch.dtype]:
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)  # returns None: the input is left as it is
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, block_type)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("compression", ["conv", "shuffle_mlp"])
def test_tokenizer_blocks_see_float32_in_every_arm(compression):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    per_arm, outputs = {}, {}
    for split in (None, 0, 1, 2, 3):  # micro encoder: depth 4; None = vanilla
        tok = build_tokenizer(TokenizerArgs(image_size=32, patch_size=4, split_depth=split, compression=compression,
                                            latent_size=4, latent_channels=8, class_token=True)).eval()
        seen, (x_hat, z) = _block_input_dtypes(tok, Block, lambda tok=tok: tok(x))
        assert len(seen) == 8  # 4 encoder + 4 decoder blocks, all ran
        per_arm[split] = set(seen.values())
        tokens = _block_input_dtypes(tok, Block, lambda tok=tok: tok.forward_tokens(x).tokens)[1]
        outputs[split] = (x_hat.dtype, tokens.dtype)
    assert per_arm == {split: {torch.float32} for split in per_arm}, per_arm
    # the pixel projection and the tokens SSL reads are float32 too
    assert outputs == {split: (torch.float32, torch.float32) for split in outputs}, outputs


def test_dit_residual_stream_and_velocity_are_float32_under_autocast():
    torch.manual_seed(0)
    dit = DiT("micro", latent_channels=8, latent_size=4, num_classes=3).eval()
    for p in dit.parameters():  # adaLN-Zero starts at zero; any weights will do for dtypes
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([0, 1])
    seen, v = _block_input_dtypes(dit, DiTBlock, lambda: dit(x, t, y))
    assert len(seen) == len(dit.blocks) and set(seen.values()) == {torch.float32}
    assert v.dtype == torch.float32


def test_ssl_head_logits_are_float32_under_autocast():
    heads = SSLHeads(48, 32, 16, hidden_dim=32, bottleneck_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls = heads.forward_cls(torch.randn(4, 48))
        patch = heads.forward_patch(torch.randn(4, 5, 48), freeze_last_layer=True)
    assert cls.dtype == patch.dtype == torch.float32
    cls.float().sum().backward()  # gradients still reach the MLP through the float32 part
    assert heads.cls_head.mlp[0].weight.grad is not None
