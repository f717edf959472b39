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
from torch import fx, nn

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


@fx.wrap  # (a leaf of the trace: it reads the mask's dtype)
def add_attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's ``attn_mask``: a boolean mask fills -inf where it is False, a float one is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.logical_not(), float("-inf"))
    return scores + mask


@fx.wrap
def sdpa_mask(mask: torch.Tensor, heads: int, padding: bool) -> torch.Tensor:
    """``nn.MultiheadAttention``'s ``attn_mask`` (``[L, S]`` or ``[B * heads, L, S]``) or, with
    ``padding``, its ``key_padding_mask`` (``[B, S]``), booleans True where attention is NOT
    allowed, in SDPA's form for scores ``[B, heads, L, S]`` (True where allowed; a float mask is
    added either way)."""
    if padding:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask.unflatten(0, (-1, heads))
    return mask.logical_not() if mask.dtype == torch.bool else mask


class DecomposedAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first, eval) built from Linear, MatMul, Softmax; masks
    are applied to the scores (they must not come from spikes); it returns the attention weights
    as the original does (averaged over heads by default)."""

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
        if is_causal and attn_mask is None:  # (as nn.MultiheadAttention: is_causal is a hint about attn_mask)
            raise ValueError(f"{self.name} (nn.MultiheadAttention): is_causal=True needs the causal attn_mask too")
        # [B, L, E] -> [B, heads, L, d]; no batch size is read, so the time-folded batch passes through.
        q = self.q_proj(query).unflatten(-1, (self.heads, -1)).transpose(-3, -2) * self.scale
        k = self.k_proj(key).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        v = self.v_proj(value).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        scores = self.scores(q, k.transpose(-2, -1))
        for mask, padding in ((attn_mask, False), (key_padding_mask, True)):
            if mask is not None:
                scores = add_attention_mask(scores, sdpa_mask(mask, self.heads, padding))
        attn = self.softmax(scores)
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
