"""Attention as separate, swappable parts: projections, the two matmuls and the softmax.

torchvision's ViT calls ``nn.MultiheadAttention``, whose fused kernel hides the matmuls. It is
replaced (numerically equal in eval mode) by :class:`DecomposedAttention`, which fx traces
through, so the projections receive spikes from signed H-MT sites and the matmuls and softmax
get expectation compensation like any other op. ``F.scaled_dot_product_attention`` (timm's ViTs,
hand-written attention) is split the same way in the traced graph (functional.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import matmul_kernel


class MatMul(nn.Module):
    """``a @ b`` as a module, so it can be swapped for its compensated form; on CPU by the compiled
    kernel where it applies (matmul_kernel.py: the operands read through their strides)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = matmul_kernel.matmul(a, b)
        return torch.matmul(a, b) if out is None else out


class Einsum(MatMul):
    """``torch.einsum(equation, a, b)`` as a module: a matmul with named dims (MaxViT's attention)."""

    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return repr(self.equation)


class DecomposedAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first, no masks, eval) built from Linear, MatMul, Softmax;
    it returns the attention weights as the original does (averaged over heads by default)."""

    # Read by nn.TransformerEncoder(Layer)'s fused fast path, which these send to the plain path
    # (the one that calls this module).
    batch_first, _qkv_same_embed_dim, in_proj_bias = True, False, None

    def __init__(self, mha: nn.MultiheadAttention, name: str = ""):
        super().__init__()
        if not mha.batch_first:
            raise ValueError(f"{name} ({type(mha).__name__}): batch_first=False puts tokens in dim 0, but "
                             f"the SNN folds time into dim 0; rebuild it with batch_first=True")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{name} ({type(mha).__name__}): add_bias_kv/add_zero_attn are not supported")
        e, self.heads = mha.embed_dim, mha.num_heads
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        projs = [nn.Linear(w.shape[1], w.shape[0], b is not None) for w, b in zip(weights, biases)]
        for proj, w, b in zip(projs, weights, biases):
            proj.weight.data.copy_(w)
            if b is not None:
                proj.bias.data.copy_(b)
        self.q_proj, self.k_proj, self.v_proj = projs
        self.out_proj = nn.Linear(e, e, mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.scale, self.name = 1.0 / math.sqrt(e // self.heads), name
        self.scores, self.mix = MatMul(), MatMul()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(f"{self.name} (nn.MultiheadAttention): attention masks are not supported here; "
                             f"F.scaled_dot_product_attention with attn_mask or is_causal converts")
        # [B, L, E] -> [B, heads, L, d]; no batch size is read, so the time-folded batch passes through.
        q = self.q_proj(query).unflatten(-1, (self.heads, -1)).transpose(-3, -2) * self.scale
        k = self.k_proj(key).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        v = self.v_proj(value).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        attn = self.softmax(self.scores(q, k.transpose(-2, -1)))
        out = self.mix(attn, v).transpose(-3, -2).flatten(-2)
        weights = (attn.mean(-3) if average_attn_weights else attn) if need_weights else None
        return self.out_proj(out), weights


def swap_children(model: nn.Module, types: tuple[type, ...], build) -> None:
    """Replace (in place) every submodule of exactly one of ``types`` by ``build(module, qualified name)``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in types:
                setattr(module, child_name, build(child, f"{name}.{child_name}" if name else child_name))


def decompose_attention(model: nn.Module) -> None:
    """Swap every ``nn.MultiheadAttention`` in ``model`` (in place) for :class:`DecomposedAttention`."""
    swap_children(model, (nn.MultiheadAttention,),
                  lambda mha, name: DecomposedAttention(mha, name).to(mha.out_proj.weight))
