"""FLOPs counted on a built model (torch); the closed forms are ``core.models.flops_formulas``.

Convention: **FLOPs = 2 · MACs** of matrix multiplications and convolutions (the
convention of ``torch.utils.flop_counter.FlopCounterMode`` and of the ViT/DiT papers);
element-wise ops, norms, softmax and biases are not counted.

``FlopCounterMode`` has no formula for the CPU fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) and so counts attention as 0 on
CPU; we register one: 4·B·heads·N_q·N_k·d_head for the two matmuls (Q·Kᵀ and P·V),
and twice that for its backward. The CUDA kernels (flash, efficient, cudnn) already
have torch's own formulas, which agree with ours.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # query (B, heads, N_q, d_head); key (B, heads, N_k, d_head); value (B, heads, N_k, d_v)
    b, h, n_q, d = query_shape
    n_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n_q * n_k * d + 2 * b * h * n_q * n_k * d_v


def _attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: four matmuls, twice the forward
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


FUSED_ATTENTION_FORMULAS: dict = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def count_flops(fn: Callable, *inputs, count_fused_attention: bool = True) -> int:
    """FLOPs (2·MACs) of ``fn(*inputs)`` (forward and, if ``fn`` calls it, backward).

    ``count_fused_attention=False`` leaves torch's defaults, under which CPU fused
    attention counts 0 (kept to show the difference in tests).
    """
    mapping = FUSED_ATTENTION_FORMULAS if count_fused_attention else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def tokenizer_flops(model, image_size: int) -> dict[str, int]:
    """FLOPs (2·MACs) of the tokenizer's encoder and decoder for ONE image.

    Parameters
    ----------
    model : core.models.tokenizer.TCAE (may live on the meta device: counting needs shapes only).
    image_size : side of the square input; must be the model's configured ``image_size``.

    Returns
    -------
    ``dict(encoder=, decoder=, total=)`` in FLOPs; the encoder includes the bottleneck,
    the decoder the latent-to-token MLP and the pixel projection.
    """
    if image_size != model.args.image_size:
        raise ValueError(f"image_size={image_size} differs from the model's image_size={model.args.image_size}")
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        encoder = count_flops(model.encoder, x)
        z = model.encoder(x)
        decoder = count_flops(model.decoder, z)
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}

