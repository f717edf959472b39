"""Max pooling from strided slices (conversion/pooling.py): the values of nn.MaxPool2d for every
kernel, stride, padding, dilation and ceil mode, NaN and infinities included; swapped in by
prepare, the user's model untouched."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hmtconv.conversion as hc
from hmtconv.conversion.compensated import Compensated
from hmtconv.conversion.pooling import SlicedMaxPool2d


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


def special_values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (3,), generator=g)] = float("nan")
    flat[torch.randint(0, flat.numel(), (3,), generator=g)] = float("inf")
    flat[torch.randint(0, flat.numel(), (3,), generator=g)] = -float("inf")
    return x


def test_every_configuration_equals_max_pool2d():
    checked = 0
    for k, s, p, d, ceil, h, w in itertools.product([2, 3, (2, 4)], [1, 2, 3, (1, 2)], [0, 1, (1, 0)], [1, 2],
                                                    [False, True], [5, 8], [6, 9]):
        ref = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
        x = special_values((2, 3, h, w), checked)
        try:
            expected = ref(x)
        except RuntimeError:  # an impossible configuration: ours must fail alike
            with pytest.raises(RuntimeError):
                SlicedMaxPool2d.from_module(ref)(x)
            continue
        assert same(SlicedMaxPool2d.from_module(ref)(x), expected), (k, s, p, d, ceil, h, w)
        checked += 1
    assert checked > 300


def test_unbatched_channels_last_and_fallbacks():
    x = special_values((4, 3, 10, 10), 0)
    pool = SlicedMaxPool2d(3, 2, 1)
    assert same(pool(x.to(memory_format=torch.channels_last)), F.max_pool2d(x, 3, 2, 1))
    assert same(pool(x[0]), F.max_pool2d(x[0], 3, 2, 1))
    out, idx = SlicedMaxPool2d(2, return_indices=True)(x)  # indices: ATen's kernel
    ref_out, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert same(out, ref_out) and torch.equal(idx, ref_idx)
    assert same(SlicedMaxPool2d(1)(x), x)  # a 1x1 window: ATen's kernel (ours would return a view)
    ints = torch.randint(-9, 9, (1, 2, 5, 5))  # no -inf to pad with: ATen's kernel
    assert torch.equal(SlicedMaxPool2d(2, padding=1)(ints), F.max_pool2d(ints, 2, padding=1))
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        SlicedMaxPool2d(2, padding=2)(x)


def test_prepare_swaps_every_max_pool_and_leaves_the_model_alone():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 10)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            x = F.relu(self.conv(x))  # read twice: the pools cannot move before its neuron
            x = F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
            return self.fc(torch.flatten(self.pool(x), 1))

    model = Functional().eval()
    data = [(torch.randn(8, 1, 16, 16), torch.zeros(8, dtype=torch.long))]
    prepared = hc.prepare(model)
    pools = [type(m) for m in prepared.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == [SlicedMaxPool2d, SlicedMaxPool2d]
    assert type(model.pool) is nn.MaxPool2d
    snn = hc.convert(hc.calibrate(prepared, data), T=4, policy="max")
    x = data[0][0]
    torch.testing.assert_close(snn.ann_forward(x), model(x))
    # both pools follow the neuron: compensated, around our pool
    wrapped = [m.module for m in snn.net.modules() if isinstance(m, Compensated)]
    assert [type(m) for m in wrapped] == [SlicedMaxPool2d, SlicedMaxPool2d]
