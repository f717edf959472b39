"""The ops of the spiking part that need no conversion: linear (or structural) on each row of the
time-folded batch ``[T*B, ...]``, so the mean of their outputs over the steps is their output on the
mean input. build.py refuses any other op of a traced graph that it cannot compensate;
unconverted.py reports the others a module-swapped model runs on spikes."""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from .attention import add_attention_mask
from .energy import REARRANGING, SYNAPTIC
from .fold import BATCHNORMS
from .functional import assign
from .multistep import ToTime
from .sites import SpikingActivation
from .windows import STRUCTURAL as WINDOW_REARRANGEMENTS

# Ops that act the same on each row of the time-folded batch and are linear (or structural).
STRUCTURAL_MODULES = (*SYNAPTIC, *BATCHNORMS, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
                      nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
                      SpikingActivation, ToTime, *REARRANGING)
STRUCTURAL_FUNCTIONS = {operator.add, operator.sub, operator.neg,
                        operator.getitem, getattr, torch.add, torch.sub, torch.cat, torch.flatten,
                        torch.reshape, torch.transpose, torch.t, torch.adjoint, torch.permute, torch.squeeze,
                        torch.unsqueeze, torch.swapaxes, torch.swapdims, torch.movedim,
                        torch.chunk, torch.split, torch.unbind, torch.mean, torch.sum, torch._assert,
                        F.dropout, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                        F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pad, torch.stack, torch.roll, torch.narrow,
                        torch.select, torch.index_select, torch.tile, torch.detach,
                        torch.flip, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, torch.repeat_interleave,
                        F.unfold, F.fold, assign, torch.cumsum,
                        *WINDOW_REARRANGEMENTS}
STRUCTURAL_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "adjoint",
                      "contiguous", "size", "dim", "squeeze", "unsqueeze", "expand", "chunk", "split", "unbind", "add",
                      "add_", "sub", "sub_", "neg", "clone", "to", "type_as", "float", "mean", "sum",
                      "swapaxes", "swapdims", "movedim", "reshape_as", "view_as", "expand_as", "roll", "flip",
                      "repeat_interleave", "unfold", "narrow", "select", "index_select", "repeat", "tile", "detach",
                      "cumsum"}
# Linear only when at most one operand varies over time (scaling by a constant or a static tensor).
SCALING = {operator.mul, operator.truediv, torch.mul, torch.div,
           "mul", "mul_", "div", "div_", torch.einsum, torch.addcmul, "addcmul"}
ADD_PRODUCT = {torch.addcmul, "addcmul"}  # input + value * tensor1 * tensor2: a product of its 2nd and 3rd arguments

# Linear in their other arguments as long as the mask (the argument at this index) does not vary over time.
MASKING = {add_attention_mask: 1, "masked_fill": 1, torch.where: 0, "where": 1}
