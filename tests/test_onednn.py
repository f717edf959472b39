"""The SNN's Linear layers through oneDNN (onednn.py): within float32 rounding of the exact
product, F.linear itself wherever oneDNN does not apply, the layer's parameters and hooks kept."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hmtconv.conversion as hc
from hmtconv.conversion import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN linear here (not an x86-64 CPU, or a torch without it)")


def within_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """|y - x w^T - b| within the float32 error bound of a K-term dot product plus a bias,
    (K + 1) * 2^-24 / (1 - (K + 1) * 2^-24) times the sum of the terms' magnitudes (Higham's gamma)."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.T + (0 if b is None else b.double())
    magnitude = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
    terms = (w.shape[1] + 1) * 2.0**-24
    return bool(((y.double() - exact).abs() <= terms / (1 - terms) * magnitude + 1e-30).all())


CASES = {  # input (at least MIN_ROWS rows: oneDNN's), out_features, bias
    "rows": (lambda: torch.randn(300, 96), 32, True),
    "tokens": (lambda: torch.randn(8, 50, 96), 40, True),
    "heads": (lambda: torch.randn(4, 3, 50, 24), 7, True),
    "strided": (lambda: torch.randn(16, 96, 50).transpose(1, 2), 24, True),
    "no bias": (lambda: torch.randn(300, 96), 32, False),
    "one output": (lambda: torch.randn(300, 96), 1, True),
    "wide": (lambda: torch.randn(256, 3072), 64, True),
}


@pytest.mark.parametrize("case", CASES)
def test_onednn_linear_is_the_linear_map_to_float32_rounding(case, monkeypatch):
    torch.manual_seed(0)
    make, out_features, bias = CASES[case]
    x = make()
    layer = onednn.Linear.from_linear(nn.Linear(x.shape[-1], out_features, bias=bias))
    calls, kernel = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        y = layer(x)
        assert calls == [1]  # oneDNN's
        assert y.shape == F.linear(x, layer.weight, layer.bias).shape
        assert within_rounding(y.reshape(-1, out_features), x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)


def test_onednn_linear_is_f_linear_where_onednn_does_not_apply_or_pay():
    """float64, autograd, fewer than MIN_ROWS rows (one sample, none): F.linear itself (bit for
    bit), gradients flowing."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    layer = onednn.Linear.from_linear(plain)
    x = torch.randn(onednn.MIN_ROWS, 16)
    with torch.no_grad():
        for few in (x[:-1], x[0], x[:0]):
            assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))
        assert torch.equal(layer.double()(x.double()), F.linear(x.double(), layer.weight, layer.bias))
    layer.float()
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias)) and y.requires_grad
    y.sum().backward()
    assert plain.weight.grad is not None  # (the same Parameter)


def test_from_linear_keeps_the_layers_parameters_hooks_and_state():
    plain = nn.Linear(6, 3)
    seen = []
    plain.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    layer = onednn.Linear.from_linear(plain.eval())
    assert layer.weight is plain.weight and layer.bias is plain.bias and not layer.training
    assert repr(layer) == repr(plain) and layer.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        layer(torch.randn(2, 6))
    assert seen == [torch.Size([2, 6])]


class ScaledLinear(nn.Linear):
    """A Linear subclass that computes otherwise."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_swap_linears_swaps_plain_linear_layers_only():
    net = nn.Sequential(nn.Linear(16, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8)), ScaledLinear(8, 4))
    onednn.swap_linears(net)
    assert [type(m) for m in net.modules() if isinstance(m, nn.Linear)] == [onednn.Linear, onednn.Linear, ScaledLinear]


def test_prepared_and_converted_models_compute_their_linear_layers_by_onednn():
    """Modules and F.linear calls alike (the trace makes those modules; a subclass is traced through)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), ScaledLinear(8, 4)).eval()
    prepared = hc.prepare(model)
    assert [type(m) for m in prepared.modules() if isinstance(m, nn.Linear)] == [onednn.Linear] * 2
    assert type(model[1]) is nn.Linear  # a copy was prepared
    data = [(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(hc.calibrate(prepared, data), T=2)
    assert [type(m) for m in snn.modules() if isinstance(m, nn.Linear)] == [onednn.Linear] * 2
