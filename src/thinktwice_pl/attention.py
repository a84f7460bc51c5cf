"""SDPA attention that keeps grouped-query K/V heads grouped on CPU.

transformers' ``sdpa`` attention lets torch handle grouped-query attention (``enable_gqa``) only on CUDA without a
mask; otherwise it first repeats each K/V head to the query heads (``repeat_kv``). On CPU every decoding step of a
left-padded batch has a mask, so each step would copy the whole KV cache ``num_key_value_groups`` times per layer.
`grouped_sdpa_attention` passes the grouped heads to torch instead: the same output, without the copy. Training
runs the same function (same logits; gradients equal up to summation order).

`use_grouped_sdpa` switches a loaded model that runs ``sdpa`` to `grouped_sdpa_attention` under the name
``sdpa_grouped``; off CPU, or for anything this function does not handle (position biases, paged caches, attention
weights), it hands the call to transformers' own ``sdpa``.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_grouped"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, Q, D]``, ``key``/``value [B, H_kv, K, D]``;
    returns ``([B, Q, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    special = kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
    if query.device.type != "cpu" or not grouped or special or kwargs.get("output_attentions", False):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)  # as transformers decides it
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any) -> None:
    """Run `grouped_sdpa_attention` in a model loaded with ``sdpa`` attention (any other choice is left alone)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, grouped_sdpa_attention)  # registering again replaces it with itself
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks sdpa takes
    model.set_attn_implementation(NAME)
