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


def converges(model, data):
    """The SNN (n = 8, identity = all) of ``model``: traced, equal to it in ANN mode, its error
    at least halved from T = 4 to 64 and under 5 %; returns the T = 64 SNN."""
    x, ref = data[0][0], model(data[0][0])
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        errors[T] = (snn(x).mean(0) - ref).abs().mean().item()
    assert snn.report.traced and snn.report.unconverted == []
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert errors[64] < 0.5 * errors[4] and errors[64] < 0.05 * ref.abs().mean()
    return snn


class HandAttention(nn.Module):
    """Single-head attention with F.scaled_dot_product_attention and F.layer_norm on buffers; mask:
    None, "bool" (causal, as a buffer), "float" (a bias buffer), "causal" (is_causal=True) or
    "spikes" (a bias computed from the activations, which cannot convert)."""

    def __init__(self, scale=None, mask=None, affine=True, explicit=False):
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 18), nn.Linear(6, 3)
        self.scale, self.explicit, self.kind = scale, explicit, mask
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        self.register_buffer("mask", causal if mask == "bool" else torch.randn(5, 5) if mask == "float" else None)
        self.register_buffer("w", torch.linspace(0.5, 1.5, 6) if affine else None)
        self.b = nn.Parameter(torch.linspace(-0.2, 0.2, 6)) if affine else None

    def forward(self, x):  # [B, 5 tokens, 6]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.explicit:  # what the split should compute
            y = ((q * (self.scale or q.size(-1) ** -0.5)) @ k.transpose(-2, -1)).softmax(-1) @ v
        else:
            mask = q @ k.transpose(-2, -1) if self.kind == "spikes" else self.mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               is_causal=self.kind == "causal")
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


@pytest.mark.parametrize("mask", ["bool", "float", "causal"])
def test_masked_attention_converts_with_the_mask_at_every_step(mask):
    """A boolean mask or is_causal fills -inf where attention is not allowed, a float mask is
    added: the same at every step, so the softmax sees its running mean plus the mask."""
    torch.manual_seed(0)
    model, data = HandAttention(mask=mask).eval(), loader((5, 6))
    converges(model, data)


def test_a_mask_computed_from_spikes_is_a_clear_error():
    with pytest.raises(ValueError, match="add_attention_mask with a mask computed from spikes"):
        hc.convert(HandAttention(mask="spikes").eval(), loader((5, 6)), n=4, T=4, policy="max", identity="all")


class TorchTransformer(nn.Module):
    """torch.nn's own encoder: its fused fast path is traced through to the attention it calls;
    ``causal``: with a causal mask (a float buffer)."""

    def __init__(self, stack: bool, causal: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stack else layer
        self.head = nn.Linear(6, 3)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(5) if causal else None)

    def forward(self, x):
        if self.mask is None:
            return self.head(self.encoder(x).mean(1))
        return self.head(self.encoder(x, self.mask, is_causal=True).mean(1))


@pytest.mark.parametrize("stack, causal", [(False, False), (True, False), (True, True)])
def test_torch_transformer_encoder_converts(stack, causal):
    torch.manual_seed(0)
    converges(TorchTransformer(stack, causal).eval(), loader((5, 6)))


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention`` with its default ``need_weights=True`` (the weights unread) and a
    boolean attention mask and key padding mask."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.register_buffer("mask", torch.rand(5, 5) < 0.3)
        self.mask.fill_diagonal_(False)  # (every query attends to itself: no row all masked)
        self.register_buffer("padding", torch.tensor([False, False, False, True, False]))

    def forward(self, x):
        h = self.embed(x)
        o, _ = self.attn(h, h, h, attn_mask=self.mask, key_padding_mask=(x[..., 0] > 1e9) | self.padding)
        return self.head(o.mean(1))


def test_masked_multihead_attention_converts_and_its_unread_weights_are_dropped():
    torch.manual_seed(0)
    snn = converges(MaskedAttention().eval(), loader((5, 6)))
    softmax = next(n for n in snn.net.graph.nodes if n.op == "call_module" and n.target.endswith("softmax"))
    assert len(softmax.users) == 1  # (the averaged weights nobody reads would be a second reader)


def test_decomposed_attention_returns_what_multihead_attention_does():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, batch_first=True).eval()
    split = hc.attention.DecomposedAttention(mha, "block.attn")
    x = torch.randn(3, 5, 6)
    for kwargs in ({}, {"average_attn_weights": False}, {"need_weights": False}):
        ours, reference = split(x, x, x, **kwargs), mha(x, x, x, **kwargs)
        torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
        assert (ours[1] is None) == (reference[1] is None)
        if ours[1] is not None:
            torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6)
    masks = [{"attn_mask": torch.rand(5, 5) < 0.3}, {"attn_mask": torch.randn(5, 5)},
             {"attn_mask": torch.randn(3 * 2, 5, 5)}, {"key_padding_mask": torch.rand(3, 5) < 0.3},
             {"key_padding_mask": torch.randn(3, 5), "attn_mask": torch.randn(5, 5)}]
    for kwargs in masks:
        if "attn_mask" in kwargs and kwargs["attn_mask"].dtype == torch.bool:
            kwargs["attn_mask"].fill_diagonal_(False)
        if "key_padding_mask" in kwargs and kwargs["key_padding_mask"].dtype == torch.bool:
            kwargs["key_padding_mask"][:, 0] = False
        for ours, reference in zip(split(x, x, x, **kwargs), mha(x, x, x, **kwargs)):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"block.attn \(nn.MultiheadAttention\): is_causal=True needs"):
        split(x, x, x, is_causal=True)


class FunctionalActivations(nn.Module):
    """The pytorch/examples MNIST net's ending (log_softmax) and clamping activations as functions."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x):
        h = F.softplus(F.hardtanh(F.relu6(F.relu(self.conv(x)) * 4), -1.0, 3.0), beta=2.0)
        return F.log_softmax(self.fc(F.adaptive_max_pool2d(h, 2).flatten(1)), dim=1)


def test_functional_activations_and_log_softmax_convert():
    torch.manual_seed(0)
    snn = converges(FunctionalActivations().eval(), loader((1, 6, 6)))
    kinds = {type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)}
    assert {"Hardtanh", "Softplus", "AdaptiveMaxPool2d", "LogSoftmax"} <= kinds
    assert [s.ceiling for s in snn.sites().values() if not s.signed] == [None, 6.0]  # F.relu6: a neuron that saturates


class Clamps(nn.Module):
    """clamp(min=0) as a ReLU, clamp(0, 2) as a clipped ReLU, clamp(-1, 1) on the logits."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = (4 * self.conv(x)).clamp(min=0).flatten(1)
        return torch.clamp(self.fc2(torch.clip(4 * self.fc1(h), 0, 2)), -1, 1)


def test_clamps_become_relus_clipped_relus_or_compensated_ops():
    torch.manual_seed(0)
    model, data = Clamps().eval(), loader((1, 4, 4))
    with torch.no_grad():
        assert (4 * model.fc1((4 * model.conv(data[0][0])).relu().flatten(1)) > 2).any()  # the ceiling matters
    snn = converges(model, data)
    assert [s.ceiling for s in snn.sites().values() if not s.signed] == [None, 2.0]
    kinds = [m.module for m in snn.modules() if isinstance(m, hc.compensated.Compensated)]
    assert [(type(m), m.min_val, m.max_val) for m in kinds] == [(nn.Hardtanh, -1.0, 1.0)]


class InPlace(nn.Module):
    """An in-place activation on the conv's output, which is read again afterwards (so it must
    read the written values), then a second in-place call after the first neuron."""

    def __init__(self, first, second):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 3)
        self.first, self.second = first, second

    def forward(self, x):
        h = 4 * self.conv(x)
        y = self.first(h)
        return self.second(self.fc((h + y).flatten(1)))


IN_PLACE = {  # name: (call, ceiling of its neuron, or the compensated module it becomes)
    "x.clamp_(0, 2)": (lambda h: h.clamp_(0, 2), 2.0), "torch.clamp_": (lambda h: torch.clamp_(h, 0, 2), 2.0),
    "x.clip_(0, 2)": (lambda h: h.clip_(0, 2), 2.0), "x.clamp_min_(0)": (lambda h: h.clamp_min_(0), None),
    "torch.clamp_min_": (lambda h: torch.clamp_min_(h, 0), None), "F.hardtanh_": (lambda h: F.hardtanh_(h, 0, 2), 2.0),
    "x.sigmoid_()": (lambda h: h.sigmoid_(), nn.Sigmoid), "torch.tanh_": (lambda h: torch.tanh_(h), nn.Tanh),
    "F.elu_": (lambda h: F.elu_(h), nn.ELU), "F.leaky_relu_": (lambda h: F.leaky_relu_(h, 0.1), nn.LeakyReLU),
}


@pytest.mark.parametrize("name", IN_PLACE)
def test_in_place_activations_convert_like_their_out_of_place_forms(name):
    """Clipping in place makes a (clipped) ReLU neuron, other activations in place a compensated op,
    as their out-of-place forms do; the conv output read after the write sees the written values."""
    torch.manual_seed(0)
    call, kind = IN_PLACE[name]
    first = call if not isinstance(kind, type) else F.relu
    second = call if isinstance(kind, type) else (lambda z: z)
    snn = converges(InPlace(first, second).eval(), loader((1, 4, 4)))
    if isinstance(kind, type):
        assert [type(m.module) for m in snn.modules() if isinstance(m, hc.compensated.Compensated)] == [kind]
    else:
        assert [s.ceiling for s in snn.sites().values() if not s.signed] == [kind]


class WritesThroughOut(nn.Module):
    """``torch.mul(..., out=buf)`` before the first neuron and ``torch.add(..., out=buf)`` after it,
    each buffer read again afterwards (so it must hold the written values)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 3)

    def forward(self, x):
        h = self.conv(x)
        buf = torch.empty_like(h)
        y = F.relu(torch.mul(h, 4.0, out=buf)) + buf
        z = torch.empty_like(y)
        torch.add(y, 1.0, out=z)
        return self.fc(F.relu(z).flatten(1))


def test_writes_through_out_convert_like_their_results():
    torch.manual_seed(0)
    converges(WritesThroughOut().eval().requires_grad_(False), loader((1, 4, 4)))  # (out= refuses autograd)


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(4), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)])
def test_instance_norm_after_neurons_is_compensated(norm):
    torch.manual_seed(0)
    if norm.track_running_stats:
        norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), norm, nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    converges(model, loader((1, 6, 6)))


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


class TimmStyleOps(nn.Module):
    """What timm's PoolFormer, ResMLP, XCiT, CoaT and BEiT do with functions: F.group_norm,
    torch.addcmul with weights, F.pad / roll / flip / stack / reshape_as / cumsum on spikes, a position
    embedding built from the input's size, a Linear whose bias is concatenated in forward, and
    Hiera's amax and VOLO's max over a dim (compensated)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(3) / 4), nn.Parameter(torch.randn(3) / 4)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6) / 4)
        self.alpha, self.beta = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6) / 4)
        self.pos = nn.Linear(1, 6)
        self.head = nn.Linear(9 * 7, 3)

    def forward(self, x):  # [B, 5 tokens, 6]
        x = torch.relu(x)
        x = F.linear(x, self.fc.weight, torch.cat((self.q_bias, self.v_bias)))
        x = F.group_norm(x.transpose(1, 2), 2, self.gn_w, self.gn_b, 1e-5).transpose(1, 2)
        x = torch.addcmul(self.beta, self.alpha, x)
        x = torch.relu(x)
        x = torch.stack((x.roll(1, 1), x.flip(2)), 0).sum(0).reshape_as(x) + torch.cumsum(x, 1) / 5 + x.cumsum(-1) / 6
        x = F.pad(x, (0, 0, 1, 1))  # 7 tokens
        pos = self.pos(torch.arange(x.size(1), dtype=x.dtype, device=x.device).unsqueeze(-1) / x.size(1))
        x = x + pos
        x = torch.cat((x, x.view(x.shape[0], 7, 2, 3).amax(2)), 2)  # Hiera's max over tokens
        return self.head(x.flatten(1)) + x.max(1)[0].sum(-1, keepdim=True) + torch.max(x, 1).values[:, :3]  # VOLO


def test_timm_style_functions_convert():
    torch.manual_seed(0)
    model, data = TimmStyleOps().eval(), loader((5, 6))
    snn = converges(model, data)
    assert not any(name.startswith("pos") for name in snn.sites())  # built from sizes: no spikes
    norms = [m.module for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
             and isinstance(m.module, nn.GroupNorm)]
    assert len(norms) == 1 and norms[0].weight is snn.net.gn_w
    assert sum(isinstance(m, hc.compensated.Compensated) and isinstance(m.module, hc.compensated.Amax)
               for m in snn.modules()) == 3


class TimmStyleCNN(nn.Module):
    """A weight-standardized F.conv2d (NFNet), LeakyReLU (CSPNet, DarkNet) and F.leaky_relu,
    powers of spikes (MetaFormer), nearest upsampling (HRNet), sliding windows (HaloNet's
    Tensor.unfold, F.unfold; VOLO's nn.Unfold and nn.Fold) and repeat_interleave (GCViT) after
    spiking neurons."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.act, self.up = nn.LeakyReLU(0.1), nn.Upsample(scale_factor=2)
        self.unfold, self.fold = nn.Unfold(3, padding=1), nn.Fold((8, 8), 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8 * 2, 3)

    def forward(self, x):  # [B, 2, 8, 8]
        x = torch.relu(self.stem(x))
        w = self.conv.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        x = self.act(F.conv2d(x, w, self.conv.bias, 2, 1))
        x = 0.5 * torch.relu(x) ** 2 + torch.square(x)  # MetaFormer's StarReLU and SquaredReLU
        x = self.up(F.leaky_relu(x, 0.2)).unfold(3, 2, 2).flatten(3)  # windows of a row (HaloNet)
        x = self.fold(self.unfold(x))  # overlapping windows summed back (VOLO)
        x = F.unfold(x, 2, stride=2)  # im2col: [B, 4 * 2 * 2, 16]
        return self.head(x.repeat_interleave(2, dim=1).flatten(1))


def test_timm_style_cnn_functions_convert():
    torch.manual_seed(0)
    model, data = TimmStyleCNN().eval(), loader((2, 8, 8))
    snn = converges(model, data)
    convs = [m for m in snn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and convs[1].stride == (2, 2)  # the functional one, standardized weight held
    kinds = {type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)}
    assert kinds == {"LeakyReLU", "Power"}


class FunctionalConv1dNet(nn.Module):
    """A 1-d CNN written with functions: F.conv1d on its own weights (dilated), F.max_pool1d
    after a ReLU (moved before it) and after a conv on spikes (compensated), F.adaptive_max_pool1d."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(6, 2, 3) / 2), nn.Parameter(torch.randn(6, 6, 3) / 3)
        self.b2, self.fc = nn.Parameter(torch.randn(6) / 4), nn.Linear(6 * 3, 4)

    def forward(self, x):  # [B, 2, 24]
        h = F.max_pool1d(F.relu(F.conv1d(x, self.w1, padding=1)), 2)
        h = F.relu(F.max_pool1d(F.conv1d(h, self.w2, self.b2, padding=2, dilation=2), 2, ceil_mode=True))
        return self.fc(F.adaptive_max_pool1d(h, 3).flatten(1))


def test_functional_1d_convolutions_and_max_pools_become_modules():
    torch.manual_seed(0)
    model, data = FunctionalConv1dNet().eval(), loader((2, 24))
    snn = converges(model, data)
    assert "conv1d_in" in snn.sites()  # the first functional conv got its y = x site (the second reads a ReLU)
    assert [m.dilation for m in snn.modules() if isinstance(m, nn.Conv1d)] == [(1,), (2,)]
    x = torch.cat([images for images, _ in data])
    with torch.no_grad():  # the first ReLU's input (after the moved pool), per channel
        top = F.max_pool1d(F.conv1d(x, model.w1, padding=1), 2).amax((0, 2))
    snn = hc.convert(model, data, n=4, T=4, policy="max", granularity="channel")
    assert [type(m.module) for m in snn.modules() if isinstance(m, hc.compensated.Compensated)] == \
        [nn.MaxPool1d, nn.AdaptiveMaxPool1d]
    torch.testing.assert_close(snn.sites()["relu"].neuron.lam, top.unsqueeze(1) / 15)


class PlainGroupNorm(nn.Module):
    """F.group_norm without weight and bias on a Conv1d's output, before and after a neuron."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv1d(2, 6, 3, padding=1), nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(F.group_norm(self.conv1(x), 3))
        return self.fc(F.group_norm(self.conv2(h), 2).mean(-1))


def test_group_norm_without_affine_parameters_traces():
    torch.manual_seed(0)
    model, data = PlainGroupNorm().eval(), loader((2, 10))
    x = torch.cat([images for images, _ in data])
    snn = hc.convert(model, data, n=4, T=4, policy="max", granularity="channel")
    assert snn.report.traced  # (a GroupNorm of one channel in 3 groups was refused: module swapping instead)
    torch.testing.assert_close(snn.ann_forward(x), model(x))
    with torch.no_grad():
        top = F.group_norm(model.conv1(x), 3).amax((0, 2))  # per channel: GroupNorm's output is [B, C, L]
    torch.testing.assert_close(snn.sites()["relu"].neuron.lam, top.unsqueeze(1) / 15)


class TorchNamespaceCalls(nn.Module):
    """Max pooling and norms called as ``torch.max_pool1d/2d`` (the aten functions, stride
    defaulting to []), ``torch.group_norm`` and ``torch.layer_norm``, or with ``functional`` set,
    as their ``F.`` versions."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 6, 3)
        self.norm = nn.LayerNorm(24)
        f = F if functional else torch
        self.pool1d, self.pool2d, self.group_norm, self.layer_norm = f.max_pool1d, f.max_pool2d, f.group_norm, f.layer_norm

    def forward(self, x):
        h = self.pool2d(torch.relu(self.conv(x)), 2)  # after a ReLU: moved before it
        h = self.group_norm(self.pool2d(h, 3, 1, 1), 2).flatten(2)  # on spikes: compensated
        h = self.pool1d(h, 6, 6, ceil_mode=True).flatten(1)
        return self.fc(self.layer_norm(h, (24,), self.norm.weight, self.norm.bias))


def test_torch_namespace_max_pools_and_norms_convert_as_the_functional_ones():
    torch.manual_seed(0)
    data = loader((2, 12, 12))
    model, reference = TorchNamespaceCalls(False).eval(), TorchNamespaceCalls(True).eval()
    reference.load_state_dict(model.state_dict())
    snn, expected = converges(model, data), hc.convert(reference, data, n=8, T=64, policy="max", identity="all")
    assert list(snn.sites()) == list(expected.sites())
    kinds = [[type(m.module) for m in net.modules() if isinstance(m, hc.compensated.Compensated)]
             for net in (snn, expected)]
    assert kinds[0] == kinds[1] and len(kinds[0]) == 5  # the moved pool sees a spiking image (identity = all)
    torch.testing.assert_close(snn(data[0][0]), expected(data[0][0]))


class Norms(nn.Module):
    """Vector norms of spikes in each way torch spells them (ConvNeXt V2's GRN, timm's and
    Hugging Face's), scaling the spikes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        g = torch.linalg.vector_norm(h, dim=-1, keepdim=True) + torch.norm(h, p=1, dim=1, keepdim=True) + \
            h.norm(dim=-1, keepdim=True) + torch.linalg.norm(h, dim=1, keepdim=True)
        return self.fc2(h * g / 8)


def test_vector_norms_of_spikes_are_compensated():
    torch.manual_seed(0)
    model, data = Norms().eval(), loader((6,))
    x, ref = data[0][0], model(data[0][0])
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        errors[T] = (snn(x).mean(0) - ref).abs().mean().item()
    assert snn.report.traced and torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert errors[64] < 0.5 * errors[4] and errors[64] < 0.05 * ref.abs().mean()
    norms = [m.module for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
             and isinstance(m.module, hc.compensated.VectorNorm)]
    assert [n.p for n in norms] == [2, 1, 2, 2]


class ConstantMasks(nn.Module):
    """``torch.where``, ``Tensor.where`` and ``masked_fill`` on spikes with masks that are the same
    at every step (a buffer), or, with ``spiking_mask``, one computed from the spikes themselves."""

    def __init__(self, spiking_mask: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.spiking_mask = nn.Linear(6, 8), nn.Linear(8, 3), spiking_mask
        self.register_buffer("mask", torch.tensor([True, False] * 4))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        mask = h > 0.3 if self.spiking_mask else self.mask
        h = torch.where(mask, h, 0.5) + h.where(~self.mask, -h) + torch.where(self.mask, h, torch.relu(self.fc1(-x)))
        return self.fc2(h.masked_fill(self.mask, 0.25))


def test_constant_masks_on_spikes_are_linear_and_masks_from_spikes_are_refused():
    torch.manual_seed(0)
    data = loader((6,))
    converges(ConstantMasks().eval(), data)
    with pytest.raises(ValueError, match=r"\(gt function, graph node .gt.\): its input varies over time"):
        hc.convert(ConstantMasks(spiking_mask=True).eval(), data, T=4, policy="max")


class Transposed(nn.Module):
    """A weight applied to transposed activations and transposed back (``(w @ h.t()).t()``: a
    Linear in disguise), in each spelling of a transpose, and ``x.mT`` of tokens ``[B, N, C]``."""

    def __init__(self, spelling):
        super().__init__()
        self.fc, self.w, self.spelling = nn.Linear(6, 6), nn.Parameter(torch.randn(5, 6) * 0.5), spelling

    def forward(self, x):
        if self.spelling == "mT":
            tokens = F.relu(self.fc(x.view(x.size(0), 2, 3).repeat(1, 1, 2)))  # [B, 2, 6]
            return (self.w @ tokens.mT).mT.flatten(1)
        h = F.relu(self.fc(x))
        if self.spelling == "t":
            return (self.w @ h.t()).t()
        if self.spelling == "torch.t":
            return torch.t(self.w @ torch.t(h))
        if self.spelling == "T":
            return (self.w.T.T @ h.T).T
        return (self.w @ h.adjoint()).adjoint()


@pytest.mark.parametrize("spelling", ["t", "torch.t", "T", "adjoint", "mT"])
def test_transposes_that_keep_the_batch_first_where_it_is_read_convert(spelling):
    torch.manual_seed(0)
    model, data = Transposed(spelling).eval(), loader((6,))
    x, ref = data[0][0], model(data[0][0])
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    assert snn.report.traced and torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert (snn(x).mean(0) - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.all(snn.sites()["relu"].fanout == 5)  # each spike meets the 5 rows of w


class FunctionalForms(nn.Module):
    """F.instance_norm, F.selu, F.celu, F.layer_norm with its shape read from the input (the
    weight's) and torch.addcmul(h, gain, h) (linear in h: only the product's factors matter) on
    spikes; with ``shapeless`` the layer norm has no weight to read its shape from."""

    def __init__(self, shapeless: bool = False):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 4, 3, padding=1), nn.Linear(4 * 8, 3)
        self.in_w, self.in_b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4) * 0.1)
        self.ln, self.gain, self.shapeless = nn.LayerNorm(8), nn.Parameter(torch.rand(8) + 0.5), shapeless

    def forward(self, x):
        h = F.instance_norm(torch.relu(self.conv(x)), weight=self.in_w, bias=self.in_b)
        h = F.selu(h) + F.celu(h, 0.5)
        h = F.layer_norm(h, h.shape[-1:]) if self.shapeless else F.layer_norm(h, h.shape[-1:], self.ln.weight,
                                                                                self.ln.bias)
        return self.fc(torch.addcmul(h, self.gain, h).flatten(1))


def test_functional_norms_selu_celu_and_addcmul_of_spikes_convert():
    torch.manual_seed(0)
    data = loader((2, 8))
    snn = converges(FunctionalForms().eval(), data)
    kinds = [type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)]
    assert kinds == ["InstanceNorm", "SELU", "CELU", "LayerNorm"]
    assert [m.module.normalized_shape for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
            and isinstance(m.module, nn.LayerNorm)] == [(8,)]
    # without a weight, its shape is the example's (convert's first calibration batch): traced at that size
    shapeless = converges(FunctionalForms(shapeless=True).eval(), data)
    assert [m.module.normalized_shape for m in shapeless.modules() if isinstance(m, hc.compensated.Compensated)
            and isinstance(m.module, nn.LayerNorm)] == [(8,)]
    # prepare without an example has no size for it: module swapping, which says why
    prepared = hc.calibrate(hc.prepare(FunctionalForms(shapeless=True).eval(), identity="all"), data)
    report = hc.convert(prepared, n=4, T=4, policy="max", identity="all").report
    assert not report.traced and "normalized_shape is read from the input's size" in report.trace_error


class OneActivation(nn.Module):
    """``call(self, h)`` on spikes between two Linear layers."""

    def __init__(self, call):
        super().__init__()
        self.l1, self.l2, self.call = nn.Linear(8, 8), nn.Linear(8, 3), call
        self.w, self.rms = nn.Parameter(torch.rand(8) + 0.5), nn.RMSNorm(8)

    def forward(self, x):
        return self.l2(self.call(self, torch.relu(self.l1(x))))


ONE_ACTIVATION = {  # name: (call, the module it becomes under compensation)
    "torch.exp": (lambda m, h: torch.exp(-h), "exp"), "x.rsqrt()": (lambda m, h: (h * h + 1).rsqrt(), "rsqrt"),
    "x.abs_()": (lambda m, h: (h - 0.5).abs_(), "abs"), "F.glu": (lambda m, h: F.glu(h, -1).repeat(1, 2), "glu"),
    "torch.logsumexp": (lambda m, h: h - torch.logsumexp(h, -1, keepdim=True), "logsumexp"),
    "F.softsign": (lambda m, h: F.softsign(h), "softsign"),
    "F.rms_norm": (lambda m, h: F.rms_norm(h, h.shape[-1:], m.w), "RMSNorm"),  # (its shape: the weight's)
    "nn.RMSNorm": (lambda m, h: m.rms(h), "RMSNorm"), "F.prelu": (lambda m, h: F.prelu(h - 0.5, m.w), "PReLU"),
}


@pytest.mark.parametrize("name", ONE_ACTIVATION)
def test_stateless_functions_of_one_activation_are_compensated(name):
    """Elementwise and per-sample functions without a module of their own (a Function), RMS norm
    and PReLU in either form: compensated like GELU, approaching the model as T grows."""
    torch.manual_seed(0)
    call, kind = ONE_ACTIVATION[name]
    snn = converges(OneActivation(call).eval(), loader((8,)))
    wrapped = [m.module for m in snn.modules() if isinstance(m, hc.compensated.Compensated)]
    assert kind in [w.fn.__name__ if isinstance(w, hc.compensated.Function) else type(w).__name__ for w in wrapped]
