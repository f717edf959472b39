"""Fold eval-mode BatchNorm into the convolution that feeds it.

The published code applies BatchNorm as an affine op at every step; folded into the conv's weights
it costs nothing, which saves one pass and one activation-sized tensor per step at every such layer.
Exact up to float rounding (tests/test_convert_snn.py checks the folded SNN against the ANN).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .tracing import hooked


class BatchNormAnyDim(_BatchNorm):
    """A ``F.batch_norm(..., training=False)`` call as a module (timm's BatchNormAct2d calls the
    function): the input's rank is unknown when the graph is edited, and eval mode needs none."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects [B, C, ...], got shape {tuple(input.shape)}")


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormAnyDim)
# (conv, BatchNorm over its channels): the pairs torch's fuse_conv_bn_eval handles.
FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every ``conv -> BatchNorm`` pair whose conv output feeds only that BatchNorm (in
    place); returns the qualified names of the BatchNorm modules folded away. A conv called at
    several places (a block applied repeatedly) keeps its BatchNorm: folded, its other calls
    would change; so do a conv or BatchNorm with forward hooks, which would see other values."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    folded = []
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and calls[source.target] == 1):
            continue
        conv, bn = gm.get_submodule(source.target), gm.get_submodule(node.target)
        if type(conv) not in FOLDABLE or type(bn) not in (FOLDABLE[type(conv)], BatchNormAnyDim) \
                or bn.training or bn.running_mean is None or any(hooked(m) for m in (conv, bn)):
            continue
        gm.set_submodule(source.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded.append(node.target)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded
