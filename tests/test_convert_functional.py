"""Models written with functions instead of modules (as timm's and hand-written models are):
``F.scaled_dot_product_attention`` split into sites, matmuls and compensated softmax like
torchvision's attention; ``F.layer_norm``, eval-mode ``F.batch_norm``, ``F.linear`` and
functional activations become the modules they stand for (timm's own models:
test_convert_models.py)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hmtconv.conversion as hc


def loader(shape, batches=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]


class HandAttention(nn.Module):
    """Single-head attention with F.scaled_dot_product_attention and F.layer_norm on buffers."""

    def __init__(self, scale=None, mask=False, affine=True, explicit=False):
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 18), nn.Linear(6, 3)
        self.scale, self.explicit = scale, explicit
        self.register_buffer("mask", torch.ones(5, 5, dtype=torch.bool).tril() if mask else None)
        self.register_buffer("w", torch.linspace(0.5, 1.5, 6) if affine else None)
        self.b = nn.Parameter(torch.linspace(-0.2, 0.2, 6)) if affine else None

    def forward(self, x):  # [B, 5 tokens, 6]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.explicit:  # what the split should compute
            y = ((q * (self.scale or q.size(-1) ** -0.5)) @ k.transpose(-2, -1)).softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scale)
        return self.out(F.layer_norm(y, (6,), self.w, self.b, 1e-6)).mean(1)


@pytest.mark.parametrize("scale,affine", [(None, True), (0.3, False)])
def test_hand_written_sdpa_and_layer_norm_convert(scale, affine):
    torch.manual_seed(0)
    model, data = HandAttention(scale, affine=affine).eval(), loader((5, 6))
    x = data[0][0]
    snn = hc.convert(model, data, n=8, T=64, policy="max", identity="all")
    assert snn.report.traced and len(snn.sites()) == 6  # qkv, both operands of both matmuls, out
    assert torch.allclose(snn.ann_forward(x), model(x), atol=1e-5)
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    norms = [m.module for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
             and isinstance(m.module, nn.LayerNorm)]
    assert len(norms) == 1 and (norms[0].weight is None) == (not affine)
    if affine:  # the (copied) model's own tensors, not copies of them
        assert norms[0].weight.data_ptr() == snn.net.w.data_ptr() and norms[0].bias is snn.net.b
    twin = HandAttention(scale, affine=affine, explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    explicit = hc.convert(twin, data, n=8, T=16, policy="max", identity="all")
    assert len(explicit.sites()) == len(snn.sites())  # (named matmul_in0 ... there, scores_in0 ... here)
    assert torch.equal(explicit(x, 16), snn(x, 16))  # the split computes the explicit path's bits


def test_masked_attention_falls_back_and_says_so():
    torch.manual_seed(0)
    model, data = HandAttention(mask=True).eval(), loader((5, 6))
    snn = hc.convert(model, data, n=4, T=4, policy="max", identity="all")
    assert not snn.report.traced and "attn_mask=a tensor" in snn.report.trace_error
    assert ("<root>", "scaled_dot_product_attention") in snn.report.unconverted


class FunctionalCNN(nn.Module):
    """conv -> F.batch_norm (eval) -> F.silu -> pool -> F.linear, every tensor the model's own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.randn(5, 6) * 0.5), nn.Parameter(torch.randn(5) * 0.1)
        self.register_buffer("mean", torch.randn(6) * 0.1)
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        h = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        h = F.silu(F.relu(h) - 0.2, inplace=True)
        return F.linear(F.adaptive_avg_pool2d(h, 1).flatten(1), self.w, self.b)


def test_functional_batch_norm_linear_and_activations_become_modules():
    torch.manual_seed(0)
    model, data = FunctionalCNN().eval(), loader((3, 8, 8))
    x = data[0][0]
    snn = hc.convert(model, data, n=8, T=64, policy="max", identity="linear")
    assert snn.report.traced and snn.report.folded_batchnorm  # the function's BatchNorm folds into the conv
    assert "linear_in" in snn.sites()  # F.linear got its site like an nn.Linear
    kinds = {type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)}
    assert "SiLU" in kinds
    assert torch.allclose(snn.ann_forward(x), model(x), atol=1e-5)
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    # the ANN's synapses, F.linear's counted like an nn.Linear's: a 3x3 conv with padding 1 on 8x8
    # has 22 in-range (output, tap) pairs per axis, for 3 x 6 channel pairs; then 6 -> 5
    assert snn.mac_ann == 22 * 22 * 3 * 6 + 6 * 5
