"""Where a 3-d activation keeps its channels: ``[B, C, L]`` (a Conv1d's) or ``[B, tokens, C]``.

Per-channel thresholds need the channel axis, which the shape alone does not give for 3-d
activations: it is found in the graph, from the layer that made the activation (or, for a site
before a layer, the layer that reads it). Unknown layouts are taken as tokens.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from .compensated import InstanceNorm
from .fold import BatchNormAnyDim
from .sites import ObservedActivation

CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, BatchNormAnyDim, nn.InstanceNorm1d, InstanceNorm,
                  nn.GroupNorm, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)
FIRST_FUNCTIONS = (F.conv1d, F.conv_transpose1d, F.batch_norm, F.instance_norm, F.group_norm, F.max_pool1d,
                   F.avg_pool1d, torch.group_norm, torch.max_pool1d)
# Ops that keep the layout of their inputs, walked through (by name: torch.add, operator.add, "add").
ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "neg", "relu", "relu_", "gelu", "silu", "sigmoid",
               "tanh", "dropout", "clamp", "clamp_min", "contiguous", "clone", "detach", "to", "float"}
KEEP_LAYOUT = ("torch.nn.modules.activation", "torch.nn.modules.dropout")  # where torch defines such modules


def made_channels_first(gm: fx.GraphModule, node: fx.Node, limit: int = 32) -> bool:
    """Whether ``node``'s value, if 3-d, is ``[B, C, L]``: the nearest layer it comes from through
    elementwise ops (a residual add's branches, activations, dropout) is a 1-d conv, norm or pool."""
    todo, seen = [node], set()
    while todo and len(seen) < limit:
        node = todo.pop(0)
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, CHANNELS_FIRST):
                return True
            if not _keeps_layout(module):  # any other layer (Linear, LayerNorm, attention...) ends the walk
                continue
        elif node.op in ("call_function", "call_method"):
            if node.target in FIRST_FUNCTIONS:
                return True
            if getattr(node.target, "__name__", node.target) not in ELEMENTWISE:
                continue
        else:
            continue
        todo += [a for a in node.args if isinstance(a, fx.Node) and a not in seen]
    return False


def read_channels_first(module: nn.Module) -> bool:
    """Whether a layer reads ``[B, C, L]`` (a 1-d conv) rather than ``[..., C]``."""
    return isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))


def _keeps_layout(module: nn.Module) -> bool:
    return isinstance(module, (nn.Identity, ObservedActivation)) or (
        type(module).__module__ in KEEP_LAYOUT and not isinstance(module, nn.MultiheadAttention))
