"""torchvision and timm models, ViT with expectation compensation, the fx fallback, and clear errors."""
import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.vision_transformer import ConvStemConfig

import hmtconv.conversion as hc
from hmtconv.conversion.sites import ObservedActivation
from hmtconv.errors import UserError
from hmtconv.snn_io import load_snn, save_snn


def loader(shape, batches=2, batch=4, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


def approaches_its_ann(model, data):
    """The SNN (n = 8, identity = all) of ``model``: traced, equal to it in ANN mode, its relative
    error at least halved from T = 4 to 32 and under 10 %; returns the T = 32 SNN."""
    x, ref = data[0][0], model(data[0][0])
    ref = getattr(ref, "logits", ref)  # a Hugging Face model's output
    errors = {}
    for T in (4, 32):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        errors[T] = ((snn(x).mean(0) - ref).abs().mean() / ref.abs().mean()).item()
    assert snn.report.traced and snn.report.unconverted == []
    assert torch.allclose(snn.ann_forward(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert errors[32] < 0.5 * errors[4] and errors[32] < 0.1
    return snn


def small_vit(**options):
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10, **options).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.3)  # torchvision zero-initializes the head
    return vit


def small_vit_with_conv_stem():
    """torchvision's other ViT options: a Conv-BN-ReLU stem (its ReLUs become neurons, so the
    patch projection gets spikes without a y = x site) and a Tanh pre-logits head (compensated)."""
    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2), ConvStemConfig(out_channels=8, kernel_size=3, stride=4)]
    return small_vit(representation_size=12, conv_stem_configs=stem)


def test_resnet18_residuals_shared_relu_and_maxpool():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = loader((3, 32, 32), batches=1, batch=2)
    snn = hc.convert(model, data, n=8, T=16, policy="max", identity="maxpool")
    assert len(snn.sites()) == 18  # 17 ReLU call sites (the reused block ReLUs split) + 1 identity
    x = data[0][0]
    ref = model(x)
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert (snn(x).mean(0) - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("name,size", [
    ("densenet121", 64), ("googlenet", 64), ("regnet_y_400mf", 64), ("shufflenet_v2_x0_5", 64), ("inception_v3", 96),
    ("resnext50_32x4d", 64), ("alexnet", 64), ("squeezenet1_1", 64)])
def test_torchvision_relu_cnns_convert_with_identity_none(name, size):
    """Concatenations (DenseNet, GoogLeNet/Inception branches), squeeze-and-excitation with ReLU
    (RegNetY), channel shuffles, grouped convs, adaptive pools: every ReLU a neuron, equal to the
    model in ANN mode, mean logits within 5 % at n = 8, T = 32."""
    torch.manual_seed(0)
    extra = dict(aux_logits=False, init_weights=False) if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, num_classes=10, **extra).eval()
    for m in model.modules():  # He-initialized throughout, so no layer's output is near zero
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
    data = loader((3, size, size), batches=1, batch=2)
    x, ref = data[0][0], model(data[0][0])
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert snn.report.traced and snn.report.unconverted == [] and len(snn.sites()) >= relus
    assert torch.allclose(snn.ann_forward(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert (snn(x).mean(0) - ref).abs().mean() < 0.05 * ref.abs().mean()


def timm_vit():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                        mlp_ratio=2, num_classes=10).eval()
    nn.init.normal_(vit.head.weight, std=0.3)
    assert vit.blocks[0].attn.fused_attn  # timm's default: F.scaled_dot_product_attention, split by convert
    return vit


@pytest.mark.parametrize("build", [small_vit, small_vit_with_conv_stem, timm_vit], ids=["torchvision", "conv_stem", "timm"])
def test_vit_converges_with_T_and_runs_with_communication(build):
    vit, data = build(), loader((3, 16, 16))
    x = data[0][0]
    ref = vit(x)
    errors = {}
    for T in (4, 64):
        snn = hc.convert(vit, data, n=4, T=T, policy="max", identity="all")
        errors[T] = (snn(x).mean(0) - ref).abs().mean().item()
    assert errors[64] < 0.5 * errors[4]
    assert snn.report.traced and snn.report.unconverted == []
    assert {"scores_in0", "scores_in1", "mix_in0", "mix_in1"} <= {name.rsplit(".", 1)[-1] for name in snn.sites()}
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    kinds = {type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)}
    assert {"LayerNorm", "GELU", "Softmax", "MatMul"} <= kinds
    if build is small_vit_with_conv_stem:  # the stem's ReLUs spike into the next conv: no y = x site before it
        assert "Tanh" in kinds and {"conv_proj.conv_bn_relu_0.2", "conv_proj.conv_bn_relu_1.2"} <= set(snn.sites())
        assert "conv_proj.conv_last_in" not in snn.sites()
    no_comm = hc.convert(vit, data, n=4, T=4, policy="max", identity="all", communicate=False)
    assert not any(s.neuron.communicate for s in no_comm.sites().values())
    assert snn.mac_static == 0  # with identity="all" the image spikes too


def test_vit_identity_linear_spikes_only_conv_and_linear_inputs():
    """identity="linear" (the paper's wording for Table 4): the sites of "all" minus the matmul operands."""
    vit, data = small_vit(), loader((3, 16, 16))
    every = set(hc.convert(vit, data, n=4, T=2, policy="max", identity="all").sites())
    linear = hc.convert(vit, data, n=4, T=16, policy="max", identity="linear")
    matmul_operands = {name for name in every if name.rsplit(".", 1)[-1].split("_in")[0] in ("scores", "mix")}
    assert len(matmul_operands) == 4 and set(linear.sites()) == every - matmul_operands
    x = data[0][0]
    assert (linear(x).mean(0) - vit(x)).abs().mean() < 0.2 * vit(x).abs().mean()


def test_vit_without_relu_needs_identity_all():
    vit, data = small_vit(), loader((3, 16, 16))
    with pytest.raises(ValueError, match="identity='all'"):
        hc.convert(vit, data)


class Untraceable(nn.Module):
    """``shared``: its one ReLU module called twice (one neuron, one set of statistics), else the
    second ReLU a function (``activation``); ``functional_head``: the last layer called through its
    weights (as timm's BEiT does)."""

    def __init__(self, shared: bool = False, functional_head: bool = False, activation=F.relu):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.shared, self.functional_head, self.activation = shared, functional_head, activation

    def forward(self, x):
        h = self.act(self.fc1(x))
        if h.max() > -1e9:  # data-dependent control flow: fx cannot trace it (a max to a number: no activation)
            h = self.act(h - 0.1) if self.shared else self.activation(h - 0.1)
        return F.linear(h, self.fc2.weight, self.fc2.bias) if self.functional_head else self.fc2(h)


@pytest.mark.parametrize("activation,name", [
    (F.relu, "relu"), (F.relu6, "relu6"), (lambda h: F.max_pool1d(h[:, None], 3, 1, 1)[:, 0], "max_pool1d"),
    (lambda h: h.clamp(max=1.0), "clamp"), (lambda h: h.sigmoid_(), "sigmoid_"), (F.leaky_relu, "leaky_relu")])
def test_untraceable_model_falls_back_and_reports_unconverted(activation, name):
    torch.manual_seed(0)
    model, data = Untraceable(activation=activation).eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=4, T=64, policy="max")
    assert not snn.report.traced and "TraceError" in snn.report.trace_error
    assert snn.report.unconverted == [("<root>", name)]  # float on spikes
    assert snn(data[0][0]).shape == (64, 4, 3)
    result = hc.evaluate(snn, data)
    assert result.unconverted == [("<root>", name)]
    assert result.energy_ratio is result.synops_cumulative is result.macs is None  # no graph, no counts


def clamp_a_view(h):
    h[:, :4].clamp_(max=0.5)  # the base, returned, holds the write
    return h


def sigmoid_into_a_buffer(h):
    out = torch.zeros_like(h)
    out.narrow(1, 0, 4).copy_(torch.sigmoid(h[:, :4]))
    return out


def linear_forms(h):
    out = torch.empty_like(h).copy_(h).type(torch.float32)
    out = out.gather(1, torch.arange(out.shape[1]).flip(0).expand_as(out))
    out = torch.where(torch.arange(out.shape[1]) % 2 == 0, out, 0.5 * out)  # a mask made of no spikes
    return torch.addmm(out, out, torch.eye(out.shape[1])) + torch.multiply(out, 2).true_divide(3) + \
        torch.positive(out.T.T) + out.mT.mT


def hardtanh_a_view(h):
    F.hardtanh(h[:, :4], 0.0, 0.5, inplace=True)  # (returns the view it wrote)
    return h


def two_writes(h):
    h[:, :4].clamp_(max=0.5)
    h[:, 4:].add_(1.0)  # linear: the storage keeps the clamp's mark
    return h


def sigmoid_assigned(h):
    out = torch.zeros_like(h)
    out[:, :4] = h[:, :4].sigmoid()
    return out


def where_on_spikes(h):
    return torch.where(h > 0.5, torch.ones_like(h), torch.zeros_like(h))


def where_alone(h):
    return h + 0 * torch.where(h > 0.5)[0].sum()  # (the indices of the condition's nonzeros)


@pytest.mark.parametrize("activation,names", [
    (lambda h: torch.maximum(h, torch.zeros_like(h)), ["maximum"]),
    (clamp_a_view, ["clamp_"]), (sigmoid_into_a_buffer, ["sigmoid"]), (linear_forms, []),
    (hardtanh_a_view, ["hardtanh"]), (two_writes, ["clamp_"]), (sigmoid_assigned, ["sigmoid"]),
    (where_on_spikes, ["gt", "where with a mask or index computed from spikes"]),
    (where_alone, ["gt", "where with a mask or index computed from spikes"]),
    (lambda h: h.gather(1, h.argsort(1)), ["argsort", "gather with a mask or index computed from spikes"]),
    (lambda h: torch.where(h > 0.5, h, 0.1 * h), ["gt", "where with a mask or index computed from spikes"]),
    (lambda h: h - h.std(1, keepdim=True), ["std"]),
    (lambda h: h / h.amax(), ["amax", "div by a spike train"]),  # a 0-d result that reaches the output
    (lambda h: h.sort(1).values, ["sort"]),
    (lambda h: h if torch.isfinite(h).all() else h, []),  # a check: its result reaches no output
])
def test_the_fallback_reports_every_op_that_is_not_linear_on_spikes(activation, names):
    """Module swapping reports what is not linear (linear_ops.py, as the traced path decides), not
    a list of known activations: torch.maximum, comparisons, sort... went unreported."""
    torch.manual_seed(0)
    model, data = Untraceable(activation=activation).eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=4, T=4, policy="max")
    assert not snn.report.traced and snn.report.unconverted == [("<root>", name) for name in names]


def assigned(h):
    out = torch.zeros_like(h)
    out[:] = h
    return out


class TwoSites(Untraceable):
    """Untraceable with a second ReLU module whose output meets the first's in ``combine(h, g)``."""

    def __init__(self, combine):
        super().__init__()
        self.act2, self.w, self.combine = nn.ReLU(), nn.Parameter(torch.randn(8, 8)), combine

    def forward(self, x):
        h = self.act(self.fc1(x))
        if h.max() > -1e9:
            h = self.combine(self, h, self.act2(self.fc1(x) - 0.1), x)
        return self.fc2(h)


@pytest.mark.parametrize("combine,found", [
    (lambda m, h, g, x: h * g, "mul of two spike trains"),
    (lambda m, h, g, x: (h[:, :, None] @ g[:, None, :]).sum(2), "matmul of two spike trains"),
    (lambda m, h, g, x: h / (g + 1), "div by a spike train"),
    (lambda m, h, g, x: h @ m.w + g * x.repeat(1, 2)[:, :8] / 2, None),  # linear in the spikes
    (lambda m, h, g, x: m.act2(torch.maximum(h, g)), "maximum"),  # wrong before a site: wrong after it
    (lambda m, h, g, x: assigned(h) * g, "mul of two spike trains"),  # (a buffer written with spikes)
])
def test_the_fallback_reports_products_of_spike_trains(combine, found):
    """Module swapping runs these on each step's spikes alike: the mean of a product of spike
    trains is not the product of their means. (A reduction over the batch dim, which mixes the
    steps, is an error: test_swapped_batch.py.)"""
    torch.manual_seed(0)
    model, data = TwoSites(combine).eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=4, T=4, policy="max")
    assert not snn.report.traced
    assert snn.report.unconverted == ([] if found is None else [("<root>", found)])


class Block(nn.Module):
    def __init__(self, act: nn.Module, pool: nn.Module):
        super().__init__()
        self.fc, self.act, self.pool = nn.Linear(8, 8), act, pool

    def forward(self, x):
        return self.pool(self.act(self.fc(x))[:, None])[:, 0]


class SharedActivations(nn.Module):
    """One ReLU and one max pooling held by two blocks, a ReLU under two names of one module, and a
    block held twice (one module called twice), around data-dependent control flow."""

    def __init__(self):
        super().__init__()
        relu, pool = nn.ReLU(), nn.MaxPool1d(3, 1, 1)
        self.a, self.b = Block(relu, pool), Block(relu, pool)
        self.c = self.d = Block(nn.ReLU6(), nn.MaxPool1d(3, 1, 1))
        self.act1 = self.act2 = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act2(self.act1(self.d(self.c(self.b(self.a(x))))) - 0.1)
        if h.max() > -1e9:  # data-dependent: fx cannot trace it
            h = h + 0
        return self.head(h)


def test_the_fallback_converts_a_module_held_by_several_parents_in_each():
    """Module swapping replaced a shared ReLU at one of its names only: the other stayed a float
    ReLU on spikes (reported), and the other max pooling uncompensated."""
    torch.manual_seed(0)
    model, data = SharedActivations().eval(), loader((8,), classes=3)
    snn = hc.convert(model, data, n=8, T=64, policy="max")
    assert not snn.report.traced and snn.report.unconverted == []
    assert list(snn.sites()) == ["a.act", "b.act", "c.act.0", "c.act.1", "act1", "act2"]  # (c is d: a site per call)
    assert model.a.act is model.b.act and model.act1 is model.act2  # (the float model is untouched)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(snn.ann_forward(x), model(x))
        assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()


def test_the_fallback_gives_each_call_of_a_module_at_one_size_its_site():
    """Module swapping: a ReLU module called twice at one size gets a site per call (its inputs
    differ by 0.1 here), with the thresholds tracing gives the two calls."""
    torch.manual_seed(0)
    model, data = Untraceable(shared=True).eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    assert not snn.report.traced and list(snn.sites()) == ["act.0", "act.1"]
    with torch.no_grad():
        h = model.act(model.fc1(torch.cat([x for x, _ in data])))
    assert [float(s.neuron.lam) for s in snn.sites().values()] == \
        pytest.approx([h.max().item() / 255, (h - 0.1).max().item() / 255], rel=1e-6)
    result = hc.evaluate(snn, data, ann=model)  # the diagnostics pair each call with its own ANN output
    assert [0 <= layer.mean_abs_error < 0.05 for layer in result.per_layer] == [True, True]


def test_an_snn_file_whose_calls_at_one_size_share_a_site_still_loads(tmp_path, monkeypatch):
    """Files written before a site per call: the module's one site, under its own name."""
    from hmtconv.conversion import fallback
    torch.manual_seed(0)
    model, data = Untraceable(shared=True).eval(), loader((6,), classes=3)
    with monkeypatch.context() as patch:
        patch.setattr(fallback, "call_sizes", lambda *args: {})  # what such a version prepared: one site
        old = hc.convert(model, data, n=4, T=8)
    assert list(old.sites()) == ["act"]
    torch.save(model, tmp_path / "model.pt")
    save_snn(old, tmp_path / "old.safetensors", model=str(tmp_path / "model.pt"), num_classes=3)
    loaded, _ = load_snn(tmp_path / "old.safetensors")
    assert list(loaded.sites()) == ["act"] and torch.equal(loaded(data[0][0]), old(data[0][0]))
    assert list(hc.convert(model, data, n=4, T=8).sites()) == ["act.0", "act.1"]  # (converted now)


@pytest.mark.parametrize("dtype,kernels", [(torch.float64, "1"), (torch.float32, "0")])
def test_the_fallback_does_not_report_what_a_sites_own_observer_computes(dtype, kernels, monkeypatch):
    """The observers' tensor path (float64, CUDA, no C compiler) takes amax and clamps of the
    site's input: the site's own work, not a float op on spikes (they were reported as
    ('act.observer', 'amax'), ...)."""
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernels)
    torch.manual_seed(0)
    model = Untraceable(shared=True).eval().to(dtype)
    data = [(x.to(dtype), y) for x, y in loader((6,), classes=3)]
    snn = hc.convert(model, data, n=4, T=4, policy="max")
    assert not snn.report.traced and snn.report.unconverted == []


def test_the_fallback_keeps_layer_attributes_and_drops_sites_never_reached():
    torch.manual_seed(0)
    model, data = Untraceable(functional_head=True).eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=8, T=64, policy="max", identity="all")
    assert not snn.report.traced
    assert snn.report.unconverted == [("<root>", "relu"), ("fc2.0", "site never reached in calibration (a branch "
                                       "the data did not take, or a layer used through its weights?): left a float op")]
    assert set(snn.sites()) == {"fc1.0", "act"}
    x = data[0][0]
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()


class BranchOnValues(nn.Module):
    """fx cannot trace it (a branch on values); ``relu`` writes over ``h``, which is read after it;
    ``relu_b`` runs only for inputs above 100."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.relu, self.relu_b = nn.ReLU(inplace=True), nn.ReLU()

    def forward(self, x):
        h = self.fc1(x)
        r = self.relu_b(h) * 2 if x.amax() > 100 else self.relu(h)
        return self.fc2(r + h)  # (after the in-place ReLU, h is r)


class UntraceableBottleneck(nn.Module):
    """torchvision's Bottleneck (``self.relu`` called at 4, 4 and 16 channels), or its BasicBlock
    (``self.relu`` called twice at 16 channels, before and after the residual add), behind a branch
    on values."""

    def __init__(self, basic: bool = False):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck
        self.stem, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 5)
        self.block = BasicBlock(16, 16) if basic else Bottleneck(16, 4)

    def forward(self, x):
        h = self.block(self.stem(x))
        if h.isnan().any():
            raise ValueError("NaN")
        return self.fc(h.mean((2, 3)))


class TraceableBottleneck(UntraceableBottleneck):
    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("policy", ["opt", "999"])
def test_the_fallback_gives_torchvisions_basic_block_the_traced_thresholds(policy):
    """BasicBlock calls ``self.relu`` twice at one size: a site per call, each with the threshold
    tracing gives that call site, and the SNN equal to the traced one."""
    torch.manual_seed(0)
    model, data = UntraceableBottleneck(basic=True).eval(), loader((3, 8, 8), classes=5)
    with torch.no_grad():  # BatchNorm statistics of a trained block: the two calls then differ in scale
        for bn in (model.block.bn1, model.block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    snn = hc.convert(model, data, n=4, T=8, policy=policy)
    assert not snn.report.traced and list(snn.sites()) == ["block.relu.0", "block.relu.1"]
    twin = TraceableBottleneck(basic=True).eval()
    twin.load_state_dict(model.state_dict())
    traced = hc.convert(twin, data, n=4, T=8, policy=policy)
    lams = [[float(s.neuron.lam) for s in net.sites().values()] for net in (snn, traced)]
    assert lams[0] == pytest.approx(lams[1], rel=1e-6) and lams[0][0] != pytest.approx(lams[0][1], rel=0.01)
    x = data[0][0]
    torch.testing.assert_close(snn(x), traced(x), rtol=1e-4, atol=1e-5)


def test_the_fallback_converts_a_relu_module_called_at_several_sizes():
    """A site per call, with the thresholds that tracing gives the same model's three call sites."""
    torch.manual_seed(0)
    model, data = UntraceableBottleneck().eval(), loader((3, 8, 8), classes=5)
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    assert not snn.report.traced and list(snn.sites()) == ["block.relu.0", "block.relu.1", "block.relu.2"]
    twin = TraceableBottleneck().eval()
    twin.load_state_dict(model.state_dict())
    traced = hc.convert(twin, data, n=8, T=32, policy="max")
    assert traced.report.traced
    assert [s.neuron.lam for s in snn.sites().values()] == [s.neuron.lam for s in traced.sites().values()]
    x = data[0][0]
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(snn.ann_forward(x), reference)
        assert (snn(x).mean(0) - reference).abs().max() < 0.02 * reference.abs().max()
    relu = snn.net.block.relu
    calls = []
    for i, site in enumerate(relu):
        site.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    snn.net.block.forward = lambda h: relu(relu(relu(relu(h))))  # (more calls than prepared, all at 16 channels)
    snn(x)
    assert calls == [2, 2, 2, 2]  # each: the last site of its size
    snn.net.block.forward = lambda h: relu(relu(relu(relu(h[:, :8]))))  # (at a size no call had)
    with pytest.raises(RuntimeError, match=r"block.relu is called on per-sample shape \(8, 8, 8\) \(call 1 of this "
                                           r"forward\), which none of its 3 sites was prepared for"):
        snn(x)


class LayerTwice(nn.Module):
    """``fc`` and ``act`` applied twice, at one size (``tokens``: the second time on 2 tokens),
    behind a branch on values unless ``traceable``."""

    def __init__(self, tokens: bool = False, traceable: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.act, self.head = nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
        self.tokens, self.traceable = tokens, traceable

    def forward(self, x):
        h = self.act(self.fc(x))
        if not self.traceable and h.isnan().any():
            raise ValueError("NaN")
        h = torch.stack([h, -h], 1) if self.tokens else h
        h = self.act(self.fc(h) + 0.1)
        return self.head(h.mean(1) if self.tokens else h)


def test_the_fallback_gives_each_call_of_a_layer_its_input_site():
    """identity="all": a Linear called twice gets a y = x site per call, the first with the
    threshold of the traced graph's (which puts none where spikes come in already, as module
    swapping does not before a layer only ever fed spikes: ``head``), and runs where the calls
    differ in size (one site could not)."""
    data = loader((6,), classes=3)
    snn = hc.convert(LayerTwice().eval(), data, n=4, T=8, identity="all")
    assert not snn.report.traced and list(snn.sites()) == ["fc.0.0", "fc.0.1", "act.0", "act.1"]
    traced = hc.convert(LayerTwice(traceable=True).eval(), data, n=4, T=8, identity="all")
    assert traced.report.traced and list(traced.sites()) == ["fc_in", "act", "act_1"]
    lams = [[float(net.sites()[name].neuron.lam) for name in names]
            for net, names in ((snn, ["fc.0.0", "act.0", "act.1"]), (traced, ["fc_in", "act", "act_1"]))]
    assert lams[0] == pytest.approx(lams[1], rel=1e-6)
    model = LayerTwice(tokens=True).eval()
    snn = hc.convert(model, data, n=8, T=64, identity="all", policy="max")
    assert list(snn.sites()) == ["fc.0.0", "fc.0.1", "act.0", "act.1", "head.0"]
    x = data[0][0]
    with torch.no_grad():
        assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()


class DropoutHead(nn.Module):
    """VGG's classifier: Linear -> ReLU -> Dropout -> Linear, here behind an identity and views too,
    and a branch on values that fx cannot trace (``swapped=True``)."""

    def __init__(self, swapped=False):
        super().__init__()
        self.swapped = swapped
        self.fc1, self.relu1, self.drop1 = nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5)
        self.fc2, self.relu2, self.drop2, self.keep = nn.Linear(8, 8), nn.ReLU(), nn.Dropout1d(0.5), nn.Identity()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        if self.swapped and x.sum() < -1e30:
            x = -x
        h = self.drop1(self.relu1(self.fc1(x)))
        return self.fc3(torch.flatten(self.keep(self.drop2(self.relu2(self.fc2(h)))).unsqueeze(1), 1))


def test_identity_all_puts_no_site_where_a_neuron_comes_in_through_dropout_or_an_identity():
    """The neuron's spikes go on through eval-mode dropout, identity modules and views as they are:
    with identity="all" the traced graph puts no y = x site before fc2 and fc3, as module swapping
    (which sees their storage handed on) does not, with the same thresholds; the SNN approaches
    the ANN."""
    data = loader((6,), classes=3)
    torch.manual_seed(0)
    traced_model = DropoutHead().eval()
    swapped_model = DropoutHead(swapped=True).eval()
    swapped_model.load_state_dict(traced_model.state_dict())
    traced = hc.convert(traced_model, data, n=8, T=64, identity="all", policy="max")
    swapped = hc.convert(swapped_model, data, n=8, T=64, identity="all", policy="max")
    assert traced.report.traced and list(traced.sites()) == ["fc1_in", "relu1", "relu2"]
    assert not swapped.report.traced and list(swapped.sites()) == ["fc1.0", "relu1", "relu2"]
    assert [float(s.neuron.lam) for s in traced.sites().values()] == \
        pytest.approx([float(s.neuron.lam) for s in swapped.sites().values()], rel=1e-6)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(traced(x), swapped(x))
        assert (traced(x).mean(0) - traced_model(x)).abs().max() < 0.05 * traced_model(x).abs().max()


class Writes(nn.Module):
    """Spikes written over after the neuron, or a neuron written into part of a float tensor: the
    Linear reading them needs its y = x site (``swapped``: fx cannot trace the branch)."""

    def __init__(self, how):
        super().__init__()
        self.how, self.fc0, self.relu, self.fc = how, nn.Linear(6, 8), nn.ReLU(inplace=how == "slice"), nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() < -1e30:
            x = -x
        if self.how == "slice":  # the ReLU writes into the first half of fc0's output
            y = self.fc0(x)
            self.relu(y[:, :4])
            return self.fc(y)
        h = self.relu(self.fc0(x)).flatten(1)
        return self.fc(h.add_(1) if self.how == "added" else h)


@pytest.mark.parametrize("how", ["slice", "added", "as_is"])
def test_module_swapping_puts_a_site_where_spikes_were_written_over(how):
    snn = hc.convert(Writes(how).eval(), loader((6,), classes=3), n=4, T=8, identity="all")
    assert not snn.report.traced and ("fc.0" in snn.sites()) == (how != "as_is")


class CalledTwice(nn.Module):
    """One Linear called on a neuron's flattened spikes (no site), then on a float (``fc_in_1``)."""

    def __init__(self, mc_dropout=False):
        super().__init__()
        self.mc_dropout = mc_dropout
        self.fc0, self.relu, self.drop, self.fc, self.out = nn.Linear(6, 8), nn.ReLU(), nn.Dropout(), \
            nn.Linear(8, 8), nn.Linear(8, 3)

    def train(self, mode=True):
        super().train(mode)
        if self.mc_dropout:  # Monte Carlo dropout: sampling at inference too
            self.drop.train()
        return self

    def forward(self, x):
        return self.out(self.fc(self.fc(self.drop(self.relu(self.fc0(x)).flatten(1)))))


def assert_reloads(snn, model, x, tmp_path):
    """Saved and loaded from ``model`` pickled, ``snn`` has its sites and outputs back."""
    torch.save(model, tmp_path / "model.pt")
    save_snn(snn, tmp_path / "snn.safetensors", model=str(tmp_path / "model.pt"), num_classes=3)
    loaded, _ = load_snn(tmp_path / "snn.safetensors")
    assert list(loaded.sites()) == list(snn.sites())
    assert torch.equal(loaded(x), snn(x))


def test_a_file_saved_now_loads_where_a_layer_skips_its_first_calls_site(tmp_path):
    """The skipped call keeps its name (``fc_in``), so the second call's site is ``fc_in_1`` both
    in convert and in load_snn's rebuild (which put the saved ``fc_in`` back on the first call);
    a dropout kept in training mode (Monte Carlo) hands on other values: its reader gets a site."""
    model, data = CalledTwice().eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=4, T=8, identity="all")
    assert list(snn.sites()) == ["fc0_in", "relu", "fc_in_1", "out_in"]
    assert_reloads(snn, model, data[0][0], tmp_path)
    sampled = hc.convert(CalledTwice(mc_dropout=True).eval(), data, n=4, T=8, identity="all")
    assert "fc_in" in sampled.sites()


@pytest.mark.parametrize("swapped", [False, True], ids=["traced", "swapped"])
def test_an_snn_file_with_a_site_before_a_layer_fed_spikes_still_loads(tmp_path, monkeypatch, swapped):
    """Files written before the look-through hold y = x sites before fc2 and fc3: rebuilt so."""
    from hmtconv.conversion import fallback, graph
    model, data = DropoutHead(swapped).eval(), loader((6,), classes=3)
    with monkeypatch.context() as patch:  # what such a version prepared
        patch.setattr(graph, "_passed_through", lambda gm, node: node)
        patch.setattr(fallback, "fed_spikes", lambda *args: set())
        old = hc.convert(model, data, n=4, T=8, identity="all")
    assert len(old.sites()) == 5 and len(hc.convert(model, data, n=4, T=8, identity="all").sites()) == 3
    assert_reloads(old, model, data[0][0], tmp_path)


class Squeezes(nn.Module):
    """One ReLU module in the body and in the head, which squeezes the pooled features (at batch 1
    the batch dim too), behind a branch on values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 6), \
            nn.Linear(6, 3)

    def forward(self, x):
        if x.isnan().any():
            raise ValueError("NaN")
        h = self.relu(self.conv(x)).mean((2, 3), keepdim=True).squeeze()
        return self.fc2(self.relu(self.fc1(h)))


def test_the_calls_are_counted_on_a_batch_a_squeeze_keeps():
    """Counted on one zero image, the head's call had per-sample shape () and calibration failed."""
    snn = hc.convert(Squeezes().eval(), loader((1, 8, 8), classes=3), n=4, T=4)
    assert not snn.report.traced and list(snn.sites()) == ["relu.0", "relu.1"]


class Repeats(nn.Module):
    """``self.relu`` after ``conv`` once, then again as many times as the batch's first pixel says
    (none below -0.5, two above 0.5, else one: twice in all for a zero image): fx cannot trace it,
    and the number of calls of the ReLU module depends on the data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.fc = nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x):
        h = self.relu(self.conv(x))
        for _ in range(int(x[0, 0, 0, 0] > -0.5) + int(x[0, 0, 0, 0] > 0.5)):
            h = self.relu(self.conv(h) + 0.2)
        return self.fc(h.flatten(1))


def test_the_fallback_runs_a_module_called_as_often_as_the_data_says(tmp_path):
    """A zero image calls ``relu`` twice: two sites. A batch calling it once uses the first, one
    calling it three times sends the third call to the last site; every step runs (calibration,
    convert's checks, evaluate) and the SNN file rebuilds the same sites."""
    data = [(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.zeros(4, dtype=torch.long))
            for seed in range(6)]
    for (x, _), first in zip(data, (0.2, -1.0, 0.95, -1.0, -1.0, 0.3)):
        x[0, 0, 0, 0] = first  # two calls, one, three, one, one, two
    model = Repeats().eval()
    prepared = hc.calibrate(hc.prepare(model, example_inputs=data[1][0]), data)  # (an example calling it once)
    counts = [int(s.observer.count) for s in prepared.relu]
    elements = 4 * 64
    assert counts == [6 * elements, 4 * elements]  # every batch's first call; the 2nd of two, the 2nd and 3rd of one
    snn = hc.convert(prepared, n=4, T=16, policy="max")
    assert list(snn.sites()) == ["relu.0", "relu.1"]
    calls = []
    for i, site in enumerate(snn.net.relu):
        site.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    for x, expected in zip((data[0][0], data[1][0], data[2][0]), ([0, 1], [0], [0, 1, 1])):
        with torch.no_grad():
            assert torch.equal(snn.ann_forward(x), model(x))
            calls.clear()
            assert (snn(x).mean(0) - model(x)).abs().max() < 0.1 * model(x).abs().max()
        assert calls == expected
    result = hc.evaluate(snn, data, ann=model)
    assert result.snn_accuracy[-1] == result.ann_accuracy
    torch.save(model, tmp_path / "repeats.pt")
    save_snn(snn, tmp_path / "repeats.safetensors", model=str(tmp_path / "repeats.pt"), num_classes=10)
    loaded, _ = load_snn(tmp_path / "repeats.safetensors")
    for x, _ in data[:3]:
        assert torch.equal(loaded(x), snn(x))


def test_a_call_at_another_size_than_its_sites_goes_to_the_last_site_of_its_size():
    """Bottleneck's sites are for 4, 4 and 16 channels: a forward calling it at 16 channels first
    sends that call to the 16-channel site, not to site 0 (whose per-channel thresholds are 4)."""
    torch.manual_seed(0)
    model, data = UntraceableBottleneck().eval(), loader((3, 8, 8), classes=5)
    snn = hc.convert(model, data, n=8, T=8, policy="max", granularity="channel")
    relu, calls = snn.net.block.relu, []
    for i, site in enumerate(relu):
        site.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    snn.net.block.forward = lambda h: relu(relu(relu(h[:, :4])).repeat(1, 4, 1, 1))  # (4, 4, then 16 channels)
    snn(data[0][0])
    snn.net.block.forward = lambda h: relu(relu(h[:, :4]).repeat(1, 4, 1, 1))  # (4, then 16 channels)
    snn(data[0][0])
    assert calls == [0, 1, 2, 0, 2]


def test_the_fallback_keeps_in_place_writes_and_the_relus_calibration_did_not_reach():
    torch.manual_seed(0)
    model, data = BranchOnValues().eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=8, T=64, policy="max")
    assert not snn.report.traced and [name for name, _ in snn.report.unconverted] == ["relu_b"]
    x = data[0][0]
    with torch.no_grad():
        reference = model(x.clone())
        assert torch.equal(snn.ann_forward(x), reference)
        assert (snn(x).mean(0) - reference).abs().max() < 0.02 * reference.abs().max()
        assert torch.equal(snn.ann_forward(x * 1e3), model(x * 1e3))  # relu_b stays a ReLU (it was an identity)


def test_a_bug_in_the_graph_passes_is_raised_not_hidden_by_the_fallback(monkeypatch):
    """Only the model's own code under fx, or a call the passes cannot express, means module
    swapping; an error of the passes themselves must surface (a typo once sent every model there)."""
    def broken(*args):
        raise AttributeError("'Node' object has no attribute 'updatearg'")
    monkeypatch.setattr(hc.graph, "move_max_pools", broken)
    with pytest.raises(AttributeError, match="updatearg"):
        hc.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), loader((4,)), policy="max")


class WithOptions(nn.Module):
    """forward takes more than the images: defaults, keyword-only, *args, **kwargs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, scale=2.0, *args, mask=None, **kwargs):
        h = torch.relu(x) if mask is None else torch.relu(x * mask)
        return self.fc(h) * scale


def test_forward_options_take_their_defaults():
    torch.manual_seed(0)
    model, data = WithOptions().eval(), loader((6,), classes=3)
    snn = hc.convert(model, data, n=8, T=64, policy="max")
    assert snn.report.traced
    x = data[0][0]
    assert torch.allclose(snn.ann_forward(x), model(x), atol=1e-6)
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.02 * model(x).abs().max()


class BadActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.block = nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Threshold(0.1, 20.0))

    def forward(self, x):
        return self.block(self.fc(x))


def test_unsupported_module_after_a_neuron_is_a_clear_error():
    with pytest.raises(ValueError, match=r"block \(Threshold module 'block.1'.*register_compensated"):
        hc.convert(BadActivation().eval(), loader((4,)), policy="max")


class SquarePlusSine(nn.Module):
    """A user's stateless nonlinearity: without registration an error after neurons (atan)."""

    def forward(self, x):
        return x * x + torch.sin(torch.atan(x))


def test_a_registered_module_of_the_users_is_compensated_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), SquarePlusSine(), nn.Linear(8, 3)).eval()
    data, x = loader((4,)), loader((4,))[0][0]
    with pytest.raises(ValueError, match=r"atan function.*register_compensated"):
        hc.convert(model, data, policy="max")
    for wrong, error in ((nn.Conv2d, ValueError), ("x", TypeError), (SquarePlusSine(), TypeError)):
        with pytest.raises(error, match="synaptic layer|takes an nn.Module subclass"):
            hc.register_compensated(wrong)
    hc.register_compensated(SquarePlusSine)
    try:
        errors = [(hc.convert(model, data, n=8, T=T, policy="max")(x).mean(0) - model(x)).abs().max() for T in (4, 64)]
        snn = hc.convert(model, data, n=8, T=4, policy="max")
    finally:
        hc.compensated.COMPENSATED.discard(SquarePlusSine)
    assert [type(m.module) for m in snn.modules() if isinstance(m, hc.compensated.Compensated)] == [SquarePlusSine]
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.02 * model(x).abs().max()
    torch.testing.assert_close(snn.ann_forward(x), model(x))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.rnn = nn.Linear(4, 4), nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):  # [B, steps, 4]
        return self.rnn(torch.relu(self.fc(x)))[0].mean(1)


def test_a_module_returning_a_tuple_after_a_neuron_is_checked_too():
    with pytest.raises(ValueError, match=r"LSTM module 'rnn'"):
        hc.convert(Recurrent().eval(), loader((5, 4)), policy="max")


def test_unsupported_function_after_a_neuron_is_a_clear_error():
    class Atan(nn.Module):
        def forward(self, x):
            return torch.atan(torch.relu(x))
    with pytest.raises(ValueError, match="atan function.*call it from a small nn.Module and register that"):
        hc.convert(Atan().eval(), loader((4,)), policy="max")


class Gate(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.fc1, self.fc2, self.op = nn.Linear(4, 4), nn.Linear(4, 4), op

    def forward(self, x):
        a, b = torch.relu(self.fc1(x)), torch.relu(self.fc2(x))
        if self.op == "reciprocal":  # a constant over a spike train: not linear in it either
            return 2.0 / (1 + b)
        return a.mul_(b) if self.op == "mul_" else a * b if self.op == "mul" else a / (1 + b)


@pytest.mark.parametrize("op,module", [("mul", hc.compensated.Multiply), ("div", hc.compensated.Divide),
                                       ("reciprocal", hc.compensated.Divide)])
def test_product_or_quotient_of_two_spike_trains_is_compensated(op, module):
    torch.manual_seed(0)
    model, data = Gate(op).eval(), loader((4,))
    snn = hc.convert(model, data, n=8, T=64, policy="max")
    compensated = [m for m in snn.modules() if isinstance(m, hc.compensated.Compensated)]
    assert len(compensated) == 1 and isinstance(compensated[0].module, module)
    x = data[0][0]
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.02 * model(x).abs().max()


def test_an_in_place_product_of_two_spike_trains_is_a_clear_error():
    with pytest.raises(ValueError, match=r"product mul_ of two time-varying tensors"):
        hc.convert(Gate("mul_").eval(), loader((4,)), policy="max")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "vgg16_bn", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"])
def test_full_size_torchvision_models_convert(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    attention = name.startswith(("vit", "swin", "maxvit"))
    size = 224 if attention else 64
    data = loader((3, size, size), batches=1, batch=2)
    snn = hc.convert(model, data, n=4, T=2, policy="999", identity="all" if attention else "maxpool")
    result = hc.evaluate(snn, data, ann=model)
    assert len(result.snn_accuracy) == 2 and result.energy_ratio[1] > 0


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_beyond_relu_convert(name):
    """ReLU6, Hardswish/Hardsigmoid and SiLU (compensated), squeeze-and-excitation gates (a product
    of two spike trains: compensated), eval-mode stochastic depth (dropped), LayerNorm2d (F.layer_norm):
    with a signed site before every Conv/Linear they trace, and approach the ANN as T grows."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    for m in model.modules():  # He-initialized throughout: torchvision's own init leaves outputs near 1e-13
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
    data = loader((3, 64, 64), batches=1, batch=2)
    snn = approaches_its_ann(model, data)
    gates = any(isinstance(m, hc.compensated.Compensated) and isinstance(m.module, hc.compensated.Multiply)
                for m in snn.modules())
    assert gates == (name in ("mobilenet_v3_small", "efficientnet_b0"))


@pytest.mark.filterwarnings("ignore:activations all below")  # random weights: tiny squeeze-excitation inputs
def test_maxvit_attention_einsums_are_compensated_matmuls():
    """torchvision's MaxViT takes q k^T and attn v with torch.einsum and swaps axes for its grid
    partition: each einsum of two activations becomes an Einsum module with a site on both
    operands and expectation compensation, and the model approaches its ANN."""
    torch.manual_seed(0)
    model = torchvision.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                                      block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    data = loader((3, 32, 32), batches=1, batch=2)
    snn = approaches_its_ann(model, data)
    einsums = [m for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
               and isinstance(m.module, hc.attention.Einsum)]
    assert len(einsums) == 4  # q k^T and attn v in the block and the grid attention
    assert sum(name.rsplit(".", 1)[-1].startswith("einsum") for name in snn.sites()) == 8


def small_swin(v2: bool):
    """Two stages: shifted windows with the mask on 8 x 8 tokens (9 x 9 at 36 px: padded), then a
    stage one window covers (no shift)."""
    from torchvision.models import swin_transformer as swin
    torch.manual_seed(0)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                                 stochastic_depth_prob=0.0, num_classes=10, **extra).eval()
    for m in model.modules():  # torchvision's init leaves the outputs tiny
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=(2 / m.weight.shape[1]) ** 0.5)
    return model


@pytest.mark.parametrize("size", [32, 36])
@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_window_attention_is_decomposed_and_approaches_its_ann(v2, size):
    """torchvision's shifted-window attention (one fx leaf) becomes Linear, MatMul, softmax (and
    V2's cosine normalization) modules around size-dependent rearrangements; equal to the model
    in ANN mode, and the SNN approaches it."""
    model, data = small_swin(v2), loader((3, size, size), batches=1, batch=2)
    snn = approaches_its_ann(model, data)
    kinds = {type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)}
    assert {"MatMul", "Softmax", "LayerNorm", "GELU"} <= kinds and ("Normalize" in kinds) == v2
    assert not any(".cpb_mlp." in name for name in snn.sites())  # V2's position-bias MLP: weights only


class _EinsumNet(nn.Module):
    """Attention written with einsum in both call forms, and a Linear as an einsum with its weight."""

    def __init__(self):
        super().__init__()
        self.qk, self.weight, self.head = nn.Linear(4, 8), nn.Parameter(torch.randn(4, 4) / 2), nn.Linear(4, 3)

    def forward(self, x):  # x [B, tokens, 4]
        x = torch.relu(x)
        q, k = self.qk(x).chunk(2, -1)
        attn = torch.einsum("bic,bjc->bij", q, k).softmax(-1)
        mixed = torch.einsum("bij,bjc->bic", [attn, x])  # list form
        return self.head(torch.einsum("bnc,dc->bnd", torch.relu(mixed), self.weight).mean(1))


def test_einsum_of_two_activations_is_a_compensated_module_with_a_weight_linear():
    torch.manual_seed(0)
    model, data = _EinsumNet().eval(), loader((5, 4), batches=1, batch=4)
    x, ref = data[0][0], model(data[0][0])
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=4, T=T, policy="max")
        errors[T] = (snn(x).mean(0) - ref).abs().mean().item()
    assert errors[64] < 0.5 * errors[4]
    equations = sorted(m.module.equation for m in snn.modules() if isinstance(m, hc.compensated.Compensated)
                       and isinstance(m.module, hc.attention.Einsum))
    assert equations == ["bic,bjc->bij", "bij,bjc->bic"]  # the weight's einsum is linear: not compensated
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-6)


class _ThreeWay(nn.Module):
    def __init__(self, activations: int):
        super().__init__()
        self.activations, self.a, self.b = activations, nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        x = torch.relu(x)
        if self.activations == 1:
            return torch.einsum("bi,ij,jk->bk", x, self.a, self.b)
        return torch.einsum("bi,bi,bi->b", x, x, x).unsqueeze(1)


def test_einsum_of_three_operands_is_linear_in_one_activation_and_an_error_for_more():
    data = loader((6,), batches=1, batch=8)
    torch.manual_seed(0)
    model = _ThreeWay(1).eval()
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    x, ref = data[0][0], model(data[0][0])
    assert (snn(x).mean(0) - ref).abs().mean() < 0.05 * ref.abs().mean()
    with pytest.raises(ValueError, match="einsum"):
        hc.convert(_ThreeWay(3).eval(), data, n=4, T=4, policy="max")


class _PositionBiasMLP(nn.Module):
    """Swin V2's continuous position bias: an MLP with a ReLU applied to a constant table, whose
    output (a function of the weights only) is added to the activations."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 12).view(6, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        bias = self.mlp(self.table).flatten()
        return self.head(torch.relu(self.fc(torch.relu(x)) + bias))


@pytest.mark.parametrize("identity", ["none", "all"])
def test_activations_computed_from_weights_alone_do_not_spike(identity):
    torch.manual_seed(0)
    model, data = _PositionBiasMLP().eval(), loader((6,), batches=1, batch=8)
    snn = hc.convert(model, data, n=4, T=64, policy="max", identity=identity)
    assert list(snn.sites()) == ["relu", "relu_1"]  # fc and head read the ReLUs' spikes; mlp gets no site
    x, ref = data[0][0], model(data[0][0])
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-6)
    assert (snn(x).mean(0) - ref).abs().mean() < 0.05 * ref.abs().mean()


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_100",
                                  "regnety_002"])
def test_timm_models_trace_and_approach_their_ann(name):
    torch.manual_seed(0)
    relu_only = name.startswith("resnet")  # the others need a signed site before every Conv/Linear
    model = timm.create_model(name, num_classes=10, **({"img_size": 32} if name.startswith("deit") else {})).eval()
    data = loader((3, 32, 32), batches=1, batch=4)
    snn = hc.convert(model, data, n=4, T=32, policy="max", identity="maxpool" if relu_only else "all")
    assert snn.report.traced and snn.report.unconverted == []
    x, ref = data[0][0], model(data[0][0])
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert (snn(x).mean(0) - ref).abs().mean() < 0.05 * ref.abs().mean()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224",
                                  "levit_128s", "xcit_nano_12_p16_224", "coat_lite_tiny", "poolformer_s12",
                                  "resmlp_12_224", "edgenext_xx_small", "cait_xxs24_224", "pvt_v2_b0", "gcvit_xxtiny",
                                  "nfnet_l0", "cspresnet50", "hrnet_w18_small", "mobilevit_xxs", "twins_svt_small",
                                  "convit_tiny", "crossvit_tiny_240", "nest_tiny", "vgg11", "efficientvit_m0",
                                  "mvitv2_tiny", "hiera_tiny_224", "halonet26t", "caformer_s18"])
def test_timm_families_trace_and_convert(name):
    """Masked attention (relative position biases, shifted windows), biases concatenated in
    forward, position embeddings built from sizes, group norm and affine layers as functions,
    weight-standardized F.conv2d, LeakyReLU, upsampling, attention normalized by its row sums;
    Python branches on sizes (MobileViT to EfficientViT-M: traced at the calibration size);
    item assignment into attention (MViTv2), amax over tokens (Hiera), Tensor.unfold (HaloNet),
    powers of spikes (CAFormer's StarReLU)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    size = model.pretrained_cfg["input_size"][-1]
    data = loader((3, size, size), batches=1, batch=2)
    snn = hc.convert(model, data, n=4, T=2, policy="999", identity="all")
    assert snn.report.traced and snn.report.unconverted == []
    x = data[0][0]
    ref = model(x)
    assert torch.allclose(snn.ann_forward(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert hc.evaluate(snn, data, ann=model).energy_ratio[1] > 0


class _SharedNonlinearity(nn.Module):
    """One GELU and one LayerNorm module, each called at two places (timm's CoaT calls its
    parallel blocks' MLP for several scales)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act, self.norm = nn.Linear(6, 6), nn.Linear(6, 10), nn.GELU(), nn.LayerNorm(6)

    def forward(self, x):
        a = self.norm(self.act(self.fc1(x)))
        return self.fc2(self.norm(self.act(a)))


def test_a_nonlinear_module_called_twice_gets_a_wrapper_per_call_site():
    torch.manual_seed(0)
    model, data = _SharedNonlinearity().eval(), loader((6,), batches=1, batch=8)
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        x, ref = data[0][0], model(data[0][0])
        errors[T] = ((snn(x).mean(0) - ref).abs().mean() / ref.abs().mean()).item()
    wrappers = [m for m in snn.net.modules() if isinstance(m, hc.compensated.Compensated)]
    assert len(wrappers) == 4 and len({id(w.module) for w in wrappers}) == 2  # 4 call sites, 2 modules
    assert errors[64] < 0.5 * errors[4] and errors[64] < 0.05


class _Broadcast(nn.Module):
    """A static tensor broadcast to the spike train's shape: a view of an input, which
    compensation must copy before scaling it in place."""

    def forward(self, a, b):
        return b.expand(a.shape)


@pytest.mark.parametrize("module,args,temporal", [
    (nn.GELU(), [(6 * 3, 5)], (True,)),
    (nn.Softmax(dim=-1), [(6 * 3, 2, 7)], (True,)),
    (nn.LayerNorm(5), [(6 * 3, 4, 5)], (True,)),
    (hc.attention.MatMul(), [(6 * 3, 2, 4, 3), (6 * 3, 2, 3, 4)], (True, True)),
    (hc.compensated.Multiply(), [(6 * 3, 4, 5, 5), (6 * 3, 4, 1, 1)], (True, True)),  # a squeeze-and-excitation gate
    (hc.compensated.Divide(), [(6 * 3, 2, 7), (6 * 3, 2, 1)], (True, True)),  # ConViT's attention row sums
    (hc.compensated.Amax(2), [(6 * 3, 4, 5, 3)], (True,)),  # Hiera's max over tokens
    (hc.compensated.Power(2), [(6 * 3, 5)], (True,)),  # StarReLU
    (_Broadcast(), [(6 * 3, 4), (4,)], (True, False)),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the compiled CPU kernel
def test_compensation_running_sum_is_t_times_f_of_running_mean(module, args, temporal, dtype):
    """Expectation compensation (method-facts.md): the outputs of steps 1..t add up to
    t * F(mean of the inputs of steps 1..t), checked against a loop over t."""
    steps, g = 6, torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for shape in args]
    module = module.to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    wrapped = hc.compensated.Compensated(module, temporal)
    wrapped.steps = steps
    given = [a.clone() for a in inputs]
    out = wrapped(*given).unflatten(0, (steps, -1))
    trains = [a.unflatten(0, (steps, -1)) if f else a for a, f in zip(inputs, temporal)]
    for t in range(1, steps + 1):
        means = [a[:t].mean(0) if f else a for a, f in zip(trains, temporal)]
        assert torch.allclose(out[:t].sum(0), t * module(*means), rtol=tol, atol=tol), t
    assert all(torch.equal(a, b) for a, b in zip(given, inputs))  # the inputs are left as they were


class InPlaceThenUntraceable(nn.Module):
    """An in-place SiLU whose write the model relies on, then a LayerNorm whose weight is read from
    its input (graph.normalize fails there: module swapping takes the model after normalize began)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.relu, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(inplace=True), \
            nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x)
        self.act(h)  # (h keeps the write)
        h = F.layer_norm(h, (6,), h[0, 0, 0])
        return self.head(self.relu(h).mean((2, 3)))


class InPlaceOnTheInput(nn.Module):
    """Untraceable; its first op writes over (a view of) its input."""

    def __init__(self):
        super().__init__()
        self.relu, self.relu2 = nn.ReLU(inplace=True), nn.ReLU()
        self.fc, self.head = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.relu(x.flatten(1))
        if h.sum() > -1e9:
            h = h * 1.0
        return self.head(self.relu2(self.fc(h)))


def test_the_fallback_keeps_in_place_modules_a_failed_trace_met_and_runs_a_batch_of_one():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    model = InPlaceThenUntraceable().eval()
    prepared = hc.prepare(model, example_inputs=x.clone())
    assert not isinstance(prepared, torch.fx.GraphModule)  # (module swapping)
    torch.testing.assert_close(prepared(x.clone()), model(x.clone()))  # (normalize had turned inplace off)
    model, x = InPlaceOnTheInput().eval(), torch.randn(8, 3, 2, 2)
    snn = hc.convert(model, [(x.clone(), torch.zeros(8, dtype=torch.long))], n=4, T=8)
    one = x[:1].clone()
    torch.testing.assert_close(snn(one), snn(x[:2].clone())[:, :1])  # (the steps' copies of a batch of 1 overlapped)
    assert torch.equal(one, x[:1])  # the caller's images are not written


def test_sites_pickled_before_in_place_existed_still_run():
    site = ObservedActivation(False)
    del site.__dict__["in_place"]  # as unpickled from a version without it
    assert torch.equal(site(torch.tensor([[-1.0, 2.0]])), torch.tensor([[0.0, 2.0]]))


class DefinedOutOfOrder(nn.Module):
    """Its second ReLU module made first in __init__; fx cannot trace it (a data-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.late = nn.ReLU()
        self.conv1, self.early, self.conv2, self.fc = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = self.early(self.conv1(x))
        if x.mean() > -1e9:
            x = self.late(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_per_layer_is_in_run_order_for_a_module_swapped_model():
    torch.manual_seed(0)
    model, data = DefinedOutOfOrder().eval(), loader((1, 10, 10), classes=3)
    snn = hc.convert(model, data, n=4, T=4, policy="max")
    assert not snn.report.traced and list(snn.sites()) == ["late", "early"]
    assert [layer.name for layer in hc.evaluate(snn, data, ann=model).per_layer] == ["early", "late"]


class TokensUntraceable(nn.Module):
    """ReLU spikes as tokens through a Linear of many rows (oneDNN's op, prepare.swap_linears)."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.mix, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.conv(x)).flatten(2).transpose(1, 2)  # [B, 64, 4]
        if h.max() > -1e9:
            h = self.mix(h)
        return self.fc(h.mean(1))


def test_the_fallback_does_not_report_the_linear_layers_fast_path():
    """A Linear of 256 rows or more runs oneDNN's _linear_pointwise: it was reported as float on spikes."""
    torch.manual_seed(0)
    model, data = TokensUntraceable().eval(), loader((1, 8, 8), classes=3, batch=8)
    snn = hc.convert(model, data, n=4, T=4, policy="max")
    assert not snn.report.traced and snn.report.unconverted == []
