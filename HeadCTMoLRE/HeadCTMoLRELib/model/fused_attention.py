"""Inference-only fused self-attention for DINOv3 ViT backbones.

transformers' DINOv3 attention runs three q/k/v GEMMs, then splits q and k into prefix (CLS + register)
and patch tokens, rotates the patch tokens (rotary embedding, `rotate_half` = a concatenation) and
concatenates them back: four copies of q/k per layer on strided views. On a GPU those memory-bound copies
cost more than the GEMMs (see docs/benchmarks.md). This module computes the same function with:

- one QKV GEMM (the q, k, v weights concatenated; LoRA must already be merged into them);
- the rotary embedding applied to q and k together, over all tokens, with cos = 1 and sin = 0 on the
  prefix tokens (identity), so there is no split and one concatenation per layer instead of four;
- PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels).

Shapes: hidden states (N, T, d) with T = prefix + patches; position embeddings (cos, sin) each
(patches, head_dim); output (N, T, d). Used only on models that are never trained again (the inference
cache), after `inference.merge_lora_for_inference`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _plain_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear behind a merged peft LoRA wrapper, or the module itself."""
    if hasattr(module, "lora_A") and not module.merged:
        raise ValueError("fuse the attention only after merging LoRA (inference.merge_lora_for_inference)")
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"expected a Linear projection, got {type(base).__name__}")
    return base


class FusedRotaryAttention(nn.Module):
    """Drop-in replacement for `DINOv3ViTAttention.forward` (same inputs and outputs)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        q, k, v = (_plain_linear(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj"))
        dim = q.in_features
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        # built on the meta device (no initialisation to throw away), then given the concatenated weights
        self.qkv = nn.Linear(dim, 3 * dim, bias=True, device="meta", dtype=q.weight.dtype)
        with torch.no_grad():
            biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in (q, k, v)]
            self.qkv.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), requires_grad=False)
            self.qkv.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        self.o_proj = _plain_linear(attention.o_proj)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, N, heads, T, head_dim)
        qk, v = qkv[:2], qkv[2]
        cos, sin = position_embeddings
        prefix = tokens - cos.shape[-2]
        if prefix:
            cos = torch.cat([cos.new_ones(prefix, cos.shape[-1]), cos], dim=-2)
            sin = torch.cat([sin.new_zeros(prefix, sin.shape[-1]), sin], dim=-2)
        half = self.head_dim // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk = qk * cos.to(qk.dtype) + rotated * sin.to(qk.dtype)
        out = F.scaled_dot_product_attention(qk[0], qk[1], v, attn_mask=attention_mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.o_proj(out), None


def fuse_dinov3_attention(classifier) -> int:
    """Replace every DINOv3 attention module of ``classifier`` by its fused twin; returns the count.

    A no-op (0) for other backbone families.
    """
    try:
        from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTAttention
    except ImportError:  # an older transformers without DINOv3
        return 0
    replaced = 0
    for parent in list(classifier.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DINOv3ViTAttention):
                setattr(parent, name, FusedRotaryAttention(child))
                replaced += 1
    return replaced
