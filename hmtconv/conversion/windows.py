"""Swin's shifted-window attention as swappable parts.

torchvision's Swin calls ``shifted_window_attention``, one function (a leaf for torch.fx) whose
padding, cyclic shift and mask depend on the feature map's size. :class:`WindowAttention` replaces
each ``ShiftedWindowAttention`` (V1 and V2, numerically equal in eval mode) by the same steps with
the attention itself in the open: the qkv and output Linear layers get their sites, the two
matmuls and the softmax (and V2's cosine normalization) expectation compensation, like any ViT.
Only the size-dependent rearrangements stay leaves (:func:`partition_windows`,
:func:`add_window_mask`, :func:`merge_windows`): each acts on every sample (and so on every time
step of the folded batch) alike, moving, padding or masking values without mixing them, which
convert treats as structural.
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.nn import functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2, _patch_merging_pad

from .attention import MatMul, swap_children


def _geometry(x: torch.Tensor, window: list[int], shift: list[int]) -> tuple[int, int, int, int, list[int]]:
    """``(pad_bottom, pad_right, padded H, padded W, shift)`` of ``x`` ``[B, H, W, C]``, as
    torchvision computes them: no shift along a dim that one window covers."""
    _, h, w, _ = x.shape
    pad_b, pad_r = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
    pad_h, pad_w = h + pad_b, w + pad_r
    return pad_b, pad_r, pad_h, pad_w, [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]


def partition_windows(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * windows, window tokens, C]``: padded, cyclically shifted, split."""
    pad_b, pad_r, pad_h, pad_w, shift = _geometry(x, window, shift)
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(x.shape[0], pad_h // window[0], window[0], pad_w // window[1], window[1], x.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], x.shape[-1])


def add_window_mask(attn: torch.Tensor, x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """``attn`` ``[B * windows, heads, N, N]`` plus torchvision's -100 between tokens that the cyclic
    shift brought together from different regions (where ``x`` is shifted at all)."""
    _, _, pad_h, pad_w, shift = _geometry(x, window, shift)
    if sum(shift) == 0:
        return attn
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = attn.new_zeros((pad_h, pad_w))
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
    n = attn.shape[-1]
    attn = attn.view(attn.shape[0] // windows, windows, attn.shape[1], n, n) + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, attn.shape[2], n, n)


def merge_windows(y: torch.Tensor, x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """:func:`partition_windows` undone: ``y`` ``[B * windows, N, C]`` back to ``x``'s ``[B, H, W, C]``."""
    _, _, pad_h, pad_w, shift = _geometry(x, window, shift)
    b, h, w, c = x.shape
    y = y.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :h, :w, :].contiguous()


for _leaf in ("partition_windows", "add_window_mask", "merge_windows"):
    fx.wrap(_leaf)  # sizes are read at run time, so fx records these as calls
# Rearrangements convert treats as structural (torchvision's patch merging pads and gathers 2 x 2 tokens).
STRUCTURAL = (partition_windows, add_window_mask, merge_windows, _patch_merging_pad)


class Normalize(nn.Module):
    """``F.normalize`` as a module (V2's cosine attention), compensated like any nonlinear op."""

    def __init__(self, p: float = 2.0, dim: int = 1, eps: float = 1e-12):
        super().__init__()
        self.p, self.dim, self.eps = p, dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, self.p, self.dim, self.eps)


class WindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` or ``...V2`` (eval mode) with its qkv and output
    Linear layers, matmuls and softmax as modules; the relative position bias comes from the
    original module, a function of its weights alone."""

    def __init__(self, attn: ShiftedWindowAttention):
        super().__init__()
        self.source = attn  # its get_relative_position_bias()
        self.window, self.shift, self.heads = list(attn.window_size), list(attn.shift_size), attn.num_heads
        self.cosine = isinstance(attn, ShiftedWindowAttentionV2)
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.cosine and attn.qkv.bias is not None:  # V2 ignores the keys' bias (zeroes a copy in forward)
            self.qkv = nn.Linear(attn.qkv.in_features, attn.qkv.out_features).to(attn.qkv.weight)
            self.qkv.weight = attn.qkv.weight
            bias = attn.qkv.bias.detach().clone()
            bias[bias.numel() // 3:2 * bias.numel() // 3] = 0
            self.qkv.bias = nn.Parameter(bias, requires_grad=False)
        self.scale = (attn.qkv.in_features // self.heads) ** -0.5
        if self.cosine:
            self.normalize_q, self.normalize_k = Normalize(dim=-1), Normalize(dim=-1)
        self.scores, self.mix, self.softmax = MatMul(), MatMul(), nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.source.get_relative_position_bias()
        windows = partition_windows(x, self.window, self.shift)
        q, k, v = self.qkv(windows).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.cosine:
            attn = self.scores(self.normalize_q(q), self.normalize_k(k).transpose(-2, -1))
            attn = attn * torch.clamp(self.source.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = self.scores(q * self.scale, k.transpose(-2, -1))
        attn = self.softmax(add_window_mask(attn + bias, x, self.window, self.shift))
        out = self.mix(attn, v).transpose(1, 2).flatten(-2)
        return merge_windows(self.proj(out), x, self.window, self.shift)


def decompose_window_attention(model: nn.Module) -> None:
    """Swap every torchvision ``ShiftedWindowAttention`` (and V2) in ``model``, in place."""
    swap_children(model, (ShiftedWindowAttention, ShiftedWindowAttentionV2), lambda attn, name: WindowAttention(attn))
