"""Conversion and multi-step simulation of small CNNs and MLPs."""
import copy
import io
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hmtconv.conversion as hc
from hmtconv.conversion.compensated import Compensated
from hmtconv.conversion.sites import ObservedActivation, SpikingActivation


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(64, 10)).eval()


def loader(shape=(1, 8, 8), batches=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]


def test_large_T_matches_ann_logits():
    """n = 4, T = 256, "max" policy: per-step quantization is lam/T, so the mean logits must be
    within 1 % of the logits' scale of the ANN (measured: ~3e-4 of scale)."""
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=4, T=256, policy="max")
    x = data[0][0]
    ref = model(x)
    err = (snn(x).mean(0) - ref).abs().max()
    assert err < 0.01 * ref.abs().max()
    torch.testing.assert_close(snn.ann_forward(x), ref, rtol=1e-5, atol=1e-6)  # BatchNorm folded


class ClippedReLUNet(nn.Module):
    """A clipped ReLU as a module reused in place, before a max pool, and as a function; inputs
    scaled so that many pass the ceiling."""

    def __init__(self, module: nn.Module, function):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.act, self.function, self.fc = module, function, nn.Linear(6 * 16, 10)

    def forward(self, x):
        h = F.max_pool2d(self.act(16 * self.conv1(x)), 2)
        return self.fc((self.act(16 * self.conv2(h)) + self.function(h - 3)).flatten(1))


@pytest.mark.parametrize("module,function,ceiling", [(nn.ReLU6(inplace=True), F.relu6, 6.0),
                                                     (nn.Hardtanh(0.0, 2.0), lambda h: F.hardtanh(h, 0.0, 2.0), 2.0)])
def test_clipped_relus_become_neurons_that_saturate_at_their_ceiling(module, function, ceiling):
    model, data = ClippedReLUNet(module, function).eval(), loader()
    x = data[0][0]
    with torch.no_grad():
        a = 16 * model.conv1(x)
        h = F.max_pool2d(a.clamp(0, ceiling), 2)
        b, c = 16 * model.conv2(h), h - 3
    assert (a > ceiling).float().mean() > 0.1 and (b > ceiling).float().mean() > 0.1  # the ceiling matters
    snn = hc.convert(model, data[:1], n=4, T=256, policy="max")
    expected = [a.amax(), b.amax(), c.amax()]  # "max": lam = min(largest ReLU output, ceiling) / levels
    lams = [site.neuron.lam for site in snn.sites().values()]
    assert len(lams) == 3
    for lam, top in zip(lams, expected):
        torch.testing.assert_close(lam, top.clamp(0, ceiling) / 15)
    ref = model(x)
    assert (snn(x).mean(0) - ref).abs().max() < 0.01 * ref.abs().max()
    torch.testing.assert_close(snn.ann_forward(x), ref)
    swapped = hc.convert(BranchesOnTheData(nn.Sequential(model.conv1, copy.deepcopy(module))).eval(), data[:1],
                         policy="max")
    assert not swapped.report.traced
    torch.testing.assert_close(swapped.sites()["conv.1"].neuron.lam, (a / 16).amax().clamp(0, ceiling) / 15)


class SharedConvOutput(nn.Module):
    """conv1's output feeds its BatchNorm and a shortcut, so it must not be folded; conv2's can."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv1(x)
        y = F.relu(self.bn1(y)) + y
        y = F.relu(self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def test_batchnorm_folded_only_where_the_conv_feeds_it_alone():
    torch.manual_seed(0)
    model = SharedConvOutput().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so a wrong fold would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    data = loader()
    snn = hc.convert(model, data, T=2, policy="max")
    assert snn.report.folded_batchnorm == ["bn2"]
    assert [type(m) for m in snn.net.modules()].count(nn.BatchNorm2d) == 1
    x = data[0][0]
    torch.testing.assert_close(snn.ann_forward(x), model(x), rtol=1e-5, atol=1e-6)


def test_max_pool_moved_before_neuron_and_identity_sites():
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, T=2, policy="max")
    order = [n.target for n in snn.net.graph.nodes if n.op == "call_module"]
    assert order.index("3") < order.index("2")  # maxpool now runs before the ReLU neuron
    snn = hc.convert(model, data, T=2, policy="max", identity="maxpool")
    signed = [name for name, s in snn.sites().items() if s.signed]
    assert signed == ["identity"]
    snn = hc.convert(model, data, T=2, policy="max", identity="all")
    assert sum(s.signed for s in snn.sites().values()) == 2  # the image (first conv) and the Linear


def test_first_layer_follows_eq20():
    """The first neuron sees a constant input z, so its mean output is eq. 20 exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    data = loader((6,))
    n, T = 3, 5
    snn = hc.convert(model, data, n=n, T=T, policy="999")
    site = snn.sites()["1"]
    x = data[0][0]
    seen = {}
    # the input is read before the site runs: its neuron writes its output over it
    site.register_forward_pre_hook(lambda m, a: seen.update(z=a[0][: x.shape[0]].clone()))
    site.register_forward_hook(lambda m, a, out: seen.update(out=out))
    snn(x)
    lam, z = site.neuron.lam, seen["z"]
    eq20 = lam / T * torch.clamp(torch.floor((z * T + lam / 2) / lam), 0, (2**n - 1) * T)
    assert torch.allclose(seen["out"].view(T, *z.shape).mean(0), eq20, atol=1e-6)


def test_every_t_from_one_run_and_no_state_leak():
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, T=8, policy="999")
    x = data[0][0]
    long = snn(x, 8)
    assert torch.equal(long[:3], snn(x, 3))  # causal: a shorter run is the prefix of a longer one
    assert torch.equal(snn(x, 8), long)  # nothing carried over between batches


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.shared = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = torch.relu(self.b(x)) + x
        y = self.c(x)
        y.relu_()
        y = self.shared(self.d(y).relu() + F.relu(y, inplace=True))
        return self.head(self.shared(y))


def test_functional_relus_convert():
    torch.manual_seed(0)
    model, data = Functional().eval(), loader((5,))
    snn = hc.convert(model, data, n=4, T=256, policy="max")
    assert len(snn.sites()) == 7 and snn.report.traced
    x = data[0][0]
    ref = model(x)
    assert (snn(x).mean(0) - ref).abs().max() < 0.01 * ref.abs().max()


class ModuleReLURegisteredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.act(self.c2(F.relu(self.c1(x)))).flatten(1))


def test_sites_and_per_layer_results_are_in_the_order_the_model_runs_them():
    """The functional ReLU runs first although its module (made by convert) is registered last."""
    model, data = ModuleReLURegisteredFirst().eval(), loader((1, 6, 6))
    order = []
    snn = hc.convert(model, data, T=2)
    hooks = [site.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
             for name, site in snn.sites().items()]
    snn(data[0][0])
    for hook in hooks:
        hook.remove()
    assert list(snn.sites()) == order == ["relu", "act"]
    assert [layer.name for layer in hc.evaluate(snn, data).per_layer] == order


class SizesReadAfterNeurons(nn.Module):
    """LeNet's ``h.view(x.size(0), -1)``, with the size also read by a static op."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.flatten = flatten
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, 10)

    def forward(self, x):
        batch = x.size(0)
        h = F.relu(self.conv(x.reshape(batch, 1, 8, 8)))
        return self.fc(torch.flatten(h, 1) if self.flatten else h.view(batch, -1))


def test_sizes_read_after_neurons_leave_the_analog_prefix_static():
    torch.manual_seed(0)
    model = SizesReadAfterNeurons(flatten=False).eval()
    flat = SizesReadAfterNeurons(flatten=True).eval()
    flat.load_state_dict(model.state_dict())
    data = loader()
    snn, reference = hc.convert(model, data, n=4, T=3), hc.convert(flat, data, n=4, T=3)
    rows = []
    snn.net.conv.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    x = data[0][0]
    assert torch.equal(snn(x), reference(x)) and rows == [8]  # the conv ran once, on the batch
    assert (snn.mac_static, snn.mac_step) == (reference.mac_static, reference.mac_step) and snn.mac_step == 0


class SharedBlock(nn.Module):
    """One conv -> BatchNorm -> ReLU block applied three times (weights shared)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for _ in range(3):
            h = F.relu(self.bn(self.conv(h)))
        return self.head(h.mean((2, 3)))


def test_a_conv_called_at_several_places_keeps_its_batchnorm():
    """Folded into the shared conv, the BatchNorm would be applied once per call, three times."""
    torch.manual_seed(0)
    model = SharedBlock().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    data = loader()
    snn = hc.convert(model, data, T=2, policy="max")
    assert snn.report.folded_batchnorm == []
    torch.testing.assert_close(snn.ann_forward(data[0][0]), model(data[0][0]), rtol=1e-5, atol=1e-6)


class TutorialNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial's network: one ``self.pool`` after both functional ReLUs (its
    first call, moved before the first neuron, sees the image's static values; the second, spikes),
    or, ``separate``, a pool module for each."""

    def __init__(self, separate: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2) if separate else self.pool
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_a_pool_module_called_before_and_after_the_first_neuron():
    """Wrapping the shared pool for spikes wrapped its static first call too: a batch of 3 at T = 4
    failed ("shape '[4, 0, 6, 28, 28]' is invalid"), one of 4 ran wrong. Now each spiking call
    site gets its own wrapper: the SNN equals the one with a pool module for each."""
    data = loader((3, 32, 32), batches=2, batch=3)
    shared, separate = (hc.convert(TutorialNet(s).eval(), data, n=4, T=4) for s in (False, True))
    assert shared.report.traced and [s.neuron.lam for s in shared.sites().values()] == \
        [s.neuron.lam for s in separate.sites().values()]
    for x, _ in data:
        assert torch.equal(shared(x), separate(x))
    result = hc.evaluate(shared, data, ann=TutorialNet().eval())
    assert result.snn_accuracy == hc.evaluate(separate, data).snn_accuracy


class InPlaceActivations(nn.Module):
    """In-place activation modules (``SiLU`` compensated, ``ReLU`` a neuron) whose input is read
    after them: it holds their output by then."""

    def __init__(self):
        super().__init__()
        self.conv, self.silu, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(inplace=True), nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.fc.weight.new_ones(()) * h  # (a fresh tensor: the SiLU writes over it, not over the neuron's)
        s = self.silu(h)
        r = self.relu(s - 0.2)
        return self.fc((s + h + r).mean((2, 3)))


def test_in_place_activation_modules_keep_their_writes():
    torch.manual_seed(0)
    model, data = InPlaceActivations().eval(), loader()
    x = data[0][0]
    reference = model(x)
    snn = hc.convert(model, data, n=8, T=64, policy="max", identity="all")
    torch.testing.assert_close(snn.ann_forward(x), reference, rtol=1e-5, atol=1e-6)
    assert (snn(x).mean(0) - reference).abs().max() < 0.02 * reference.abs().max()


class HookedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


@pytest.mark.parametrize("logger", ["traceable", "failing"])
def test_hooks_on_blocks_go_into_the_graph_or_away_and_hooked_batchnorms_are_not_folded(logger):
    """fx traces through blocks, running their hooks on proxies: a hook that changes the block's
    output goes into the graph; a logger's ``out.mean()`` (``.item()``) traced with it is unread
    and dropped (it reduced over the batch, which failed the conversion), and a logger that fails
    the trace (``float(...)``) is set aside alone (the output hook beside it was set aside with it);
    a hook on a BatchNorm keeps it unfolded."""
    torch.manual_seed(0)
    model, data, seen = HookedBlocks().eval(), loader(), []
    read = (lambda out: out.mean().item()) if logger == "traceable" else (lambda out: float(out.mean()))
    model.block.register_forward_hook(lambda module, args, out: out * torch.linspace(0, 1, 4).view(1, 4, 1, 1))
    model.block[1].register_forward_hook(lambda module, args, out: seen.append(("bn", out.shape[0])))
    model.block.register_forward_hook(lambda module, args, out: seen.append(read(out)))
    order = list(model.block._forward_hooks)
    said = "forward hooks on block do not run as hooks" if logger == "traceable" else \
        "a forward hook on block fails the trace .* and was dropped"
    with pytest.warns(UserWarning, match=rf"hooks on block.1 are copied .*; {said}"):
        snn = hc.convert(model, data, T=2, policy="max")
    assert snn.report.traced and snn.report.folded_batchnorm == []
    seen.clear()
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(snn.ann_forward(x), model(x), rtol=1e-5, atol=1e-6)  # the output hook traced in
    seen.clear()
    snn(x)
    assert seen == [("bn", 8)]  # (the analog prefix runs once, before the steps)
    assert list(model.block._forward_hooks) == order  # the user's model keeps its hooks, in their order


def test_each_hook_that_fails_the_trace_is_set_aside_alone_pre_hooks_too():
    """Hooks in the order output, failing logger, output: both output hooks stay traced into the
    graph, whatever their place; a value-reading pre-hook is set aside as a hook is."""
    torch.manual_seed(0)
    model, data = HookedBlocks().eval(), loader()
    scale = torch.linspace(0, 1, 4).view(1, 4, 1, 1)
    model.block.register_forward_pre_hook(lambda module, args: float(args[0].mean()) and None)
    model.block.register_forward_hook(lambda module, args, out: out * scale)
    model.block.register_forward_hook(lambda module, args, out: float(out.mean()) and None)
    model.block.register_forward_hook(lambda module, args, out: out + scale)
    with pytest.warns(UserWarning, match="a forward hook on block fails the trace") as caught:
        snn = hc.convert(model, data, T=2, policy="max")
    assert "do not run as hooks" not in str(caught[0].message)  # (the failing block is not said traced too)
    x = data[0][0]
    with torch.no_grad():
        assert snn.report.traced and torch.allclose(snn.ann_forward(x), model(x), rtol=1e-5, atol=1e-6)


class HookedThenUntraceable(HookedBlocks):
    """Traces without its blocks' hooks, then graph.normalize fails (a LayerNorm weight read from
    the input): module swapping takes the copy the hook retries left."""

    def forward(self, x):
        h = self.block(x)
        return self.fc(F.layer_norm(h, (8,), h[0, 0, 0]).mean((2, 3)))


def test_hooks_set_aside_and_put_back_keep_their_order_for_module_swapping():
    torch.manual_seed(0)
    model = HookedThenUntraceable().eval()
    hooks = [lambda module, args, out: float(out.mean()) and None, lambda module, args, out: out * 2]
    for hook in hooks:
        model.block.register_forward_hook(hook)
    with pytest.warns(UserWarning):
        prepared = hc.prepare(model, example_inputs=torch.randn(4, 1, 8, 8))
    assert not isinstance(prepared, torch.fx.GraphModule)
    assert list(prepared.block._forward_hooks.values()) == hooks


class MadeInForward(nn.Module):
    """Tensors made in forward from sizes and the device alone, without a batch dim, meet spikes."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.conv(x)) * torch.linspace(0.5, 1.5, 4, device=x.device).view(1, 4, 1, 1)
        positions = torch.arange(x.shape[3], device=x.device, dtype=x.dtype)
        rows = h.mean(3) + positions / 8  # [B, 4, 8] + [8]
        return self.fc(F.relu(rows).amax(1)) * (positions.shape[0] / 8)  # (a size of it, read after the neurons)


def test_tensors_made_in_forward_without_a_batch_dim_broadcast_over_steps():
    torch.manual_seed(0)
    model, data = MadeInForward().eval(), loader()
    snn = hc.convert(model, data, n=8, T=64, policy="max")
    x = data[0][0]
    assert snn.report.traced and (snn(x).mean(0) - model(x)).abs().max() < 0.02 * model(x).abs().max()


class Squeezed(nn.Module):
    """``squeeze()`` after the neurons (a squeeze-and-excitation style ``[B, C, 1, 1]`` and the
    logits): at batch 1 they squeeze the batch dim too."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3), keepdim=True)
        return self.fc(F.relu(h.squeeze())).squeeze(0)


@pytest.mark.parametrize("T", [1, 4])
def test_squeezes_after_neurons_keep_the_batch_dim_at_batch_one(T):
    """The SNN's rows are steps and samples: each sample's steps are its rows whatever the batch."""
    torch.manual_seed(0)
    model, data = Squeezed().eval(), loader()
    snn, x = hc.convert(model, data, n=4, T=T), data[0][0]
    assert snn(x[:1]).shape == (T, 1, 3) and torch.allclose(snn(x[:1]), snn(x)[:, :1], atol=1e-6)
    assert torch.allclose(snn.ann_forward(x[:1]).view(3), model(x[:1]), atol=1e-6)  # (the ANN's drops it)


def test_prepare_calibrate_convert_reuses_statistics():
    model, data = small_cnn(), loader()
    prepared = hc.calibrate(hc.prepare(model), data)
    counts = [m.observer.count.item() for m in prepared.modules() if isinstance(m, ObservedActivation)]
    a = hc.convert(prepared, n=4, T=4, policy="999")
    b = hc.convert(prepared, n=8, T=2, policy="max", neuron="mt")
    assert [m.observer.count.item() for m in prepared.modules() if isinstance(m, ObservedActivation)] == counts
    assert a.config.n == 4 and b.config.neuron == "mt"
    assert all(isinstance(m, SpikingActivation) for m in a.sites().values())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())  # the float model is untouched


def test_an_snn_refuses_the_thresholds_of_an_snn_of_another_n():
    prepared = hc.calibrate(hc.prepare(small_cnn()), loader()[:1])
    four, eight = (hc.convert(prepared, n=n, T=2) for n in (4, 8))
    with pytest.raises(RuntimeError, match=r"net\.\S+\.lam: thresholds of a neuron with 15 levels"):
        eight.load_state_dict(four.state_dict())
    hc.convert(prepared, n=4, T=8, policy="999").load_state_dict(four.state_dict())


def test_a_prepared_models_state_dict_carries_its_calibration():
    """Loaded into prepare() of the same model it converts alike and calibrates further; a
    prepared graph saved whole (which loses prepare's record) is a clear error."""
    model, data = small_cnn(), loader()
    half = hc.calibrate(hc.prepare(model), data[:2])
    loaded = hc.prepare(model)
    loaded.load_state_dict(half.state_dict())
    x = data[0][0]
    for granularity in ("layer", "channel"):
        kwargs = dict(n=4, T=3, policy="99.9", granularity=granularity)
        assert torch.equal(hc.convert(loaded, **kwargs)(x), hc.convert(half, **kwargs)(x))
    whole = hc.calibrate(hc.prepare(model), data)
    hc.calibrate(loaded, data[2:])
    ours, reference = loaded.state_dict(), whole.state_dict()
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-12, atol=1e-12, msg=key)
    buffer = io.BytesIO()
    torch.save(whole, buffer)
    buffer.seek(0)
    with pytest.raises(TypeError, match=r"save prepared.state_dict\(\) instead"):
        hc.convert(torch.load(buffer, weights_only=False))


class Conv1dNet(nn.Module):
    """Channels first ([B, C, L]) through a BatchNorm1d, functional ReLUs and a residual add, then
    tokens ([B, L, C]) after a transpose and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6)
        self.conv2, self.proj, self.fc = nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 5), nn.Linear(12 * 5, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h) + h)
        return self.fc(self.proj(h.transpose(1, 2)).relu().flatten(1))


def test_per_channel_thresholds_of_1d_convs_are_per_channel_not_per_position():
    torch.manual_seed(0)
    model, data = Conv1dNet().eval(), [(torch.randn(8, 2, 12), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    x = torch.cat([images for images, _ in data])
    with torch.no_grad():  # the ReLUs' inputs, computed directly, and their channels' maxima
        a = model.bn(model.conv1(x))
        b = model.conv2(a.relu()) + a.relu()
        c = model.proj(b.relu().transpose(1, 2))
    expected = {"relu": a.amax((0, 2)).unsqueeze(1), "relu_1": b.amax((0, 2)).unsqueeze(1), "relu_2": c.amax((0, 1)),
                "conv1_in": x.abs().amax((0, 2)).unsqueeze(1)}
    snn = hc.convert(model, data, n=4, policy="max", granularity="channel", identity="all")
    lams = {name: site.neuron.lam for name, site in snn.sites().items()}
    assert lams.keys() == expected.keys()  # (proj and fc read spikes already, through a transpose or a flatten)
    for name, top in expected.items():
        torch.testing.assert_close(lams[name], top / 15, msg=name)
    swapped = hc.convert(BranchesOnTheData(model.conv1).eval(), data, n=4, policy="max", granularity="channel",
                         identity="all")  # the module-swap path
    assert not swapped.report.traced
    torch.testing.assert_close(swapped.sites()["conv.0"].neuron.lam, expected["conv1_in"] / 15)


class BranchesOnTheData(nn.Module):
    """Not traceable by torch.fx."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x) if x.sum() > -1e9 else x


def test_evaluate_result_and_json():
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=4, T=4, policy="999", granularity="channel")
    result = hc.evaluate(snn, data, ann=model)
    assert len(result.snn_accuracy) == 4 and len(result.energy_ratio) == 4
    assert result.ann_accuracy is not None and result.samples == 24
    assert [layer.name for layer in result.per_layer] == ["2", "5"]
    assert all(0 <= layer.mean_abs_error < 1 for layer in result.per_layer)
    json.dumps(result.to_dict())
    assert hc.evaluate(snn, data, T=2, diagnostics=False).per_layer[0].mean_abs_error is None


@pytest.mark.parametrize("neuron,communicate", [("if", True), ("mt", True), ("hmt", False)])
def test_neuron_kinds(neuron, communicate):
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=4, T=2, policy="999", neuron=neuron, identity="maxpool",
                     communicate=communicate)
    assert snn(data[0][0]).shape == (2, 8, 10)


def test_bad_arguments_are_clear():
    model, data = small_cnn(), loader()
    with pytest.raises(ValueError, match="neuron must be one of"):
        hc.convert(model, data, neuron="lif")
    with pytest.raises(ValueError, match="needs calibration data"):
        hc.convert(model)


class SiteInputReadTwice(nn.Module):
    """The ReLU's input is also read by the shortcut, so its neuron must not write over it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        y = F.relu(y) + 0.5 * y
        return self.head(y.mean((2, 3)))


def test_neurons_write_over_their_input_only_where_nothing_else_reads_it():
    torch.manual_seed(0)
    model, data = SiteInputReadTwice().eval(), loader()
    snn = hc.convert(model, data, n=2, T=6, policy="max")
    assert {name: site.overwrite_input for name, site in snn.sites().items()} == {"relu": True, "relu_1": False}
    batches = [data[0][0], data[0][0][:1]]  # one sample: an expanded static input would alias it
    outs = [snn(x, steps) for x in batches for steps in (1, 6)]
    for site in snn.sites().values():
        site.overwrite_input = False
    for out, (x, steps) in zip(outs, [(x, steps) for x in batches for steps in (1, 6)]):
        assert torch.equal(out, snn(x, steps))


class CompensatedInputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.lin3, self.head = (nn.Linear(8, 8) for _ in range(4))
        self.gelu_a, self.gelu_b = nn.GELU(), nn.GELU()

    def forward(self, x):
        h = F.relu(self.lin1(x.flatten(1)[:, :8]))
        b = self.lin3(h)
        return self.head(self.gelu_a(self.lin2(h)) + self.gelu_b(b) + b)


def test_compensated_ops_take_running_means_in_place_only_where_nothing_else_reads_the_input():
    torch.manual_seed(0)
    model, data = CompensatedInputReadTwice().eval(), loader()
    snn = hc.convert(model, data, n=2, T=6, policy="max")
    flags = {name: m.overwrite_inputs for name, m in snn.net.named_modules() if isinstance(m, Compensated)}
    assert flags == {"gelu_a": (True,), "gelu_b": (False,)}
    outs = [snn(data[0][0], steps) for steps in (1, 6)]
    for name in flags:
        snn.net.get_submodule(name).overwrite_inputs = ()
    assert all(torch.equal(out, snn(data[0][0], steps)) for out, steps in zip(outs, (1, 6)))


class SiteInputsThroughViews(nn.Module):
    """Site inputs that are a layer's output passed on by a Dropout, viewed, or scaled (each
    read by its site alone: written over), and views of a tensor with another reader, or expanded
    (one element standing for many): not written over."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.lin3, self.lin4, self.lin5 = (nn.Linear(16, 16) for _ in range(5))
        self.drop, self.head = nn.Dropout(0.5), nn.Linear(16, 10)

    def forward(self, x):
        a = F.relu(self.drop(self.lin1(x.flatten(1)[:, :16])))
        b = F.relu(self.lin2(a).view(-1, 4, 4).transpose(1, 2)).flatten(1)
        c = F.relu(self.lin3(b) * 0.5)
        d = self.lin4(c)
        e = F.relu(d.view(-1, 4, 4)).flatten(1) + d
        return self.head(F.relu(self.lin5(e)[:, :1].expand(-1, 16)) + e)


def test_neurons_write_over_inputs_passed_on_by_views_identities_and_arithmetic():
    torch.manual_seed(0)
    model, data = SiteInputsThroughViews().eval(), loader()
    snn = hc.convert(model, data, n=2, T=6, policy="max")
    assert {name: site.overwrite_input for name, site in snn.sites().items()} == {
        "relu": True, "relu_1": True, "relu_2": True, "relu_3": False, "relu_4": False}
    outs = [snn(data[0][0], steps) for steps in (1, 6)]
    for site in snn.sites().values():
        site.overwrite_input = False
    assert all(torch.equal(out, snn(data[0][0], steps)) for out, steps in zip(outs, (1, 6)))


def test_site_policy_overrides_equal_separate_conversions():
    """Each site of a mixed-policy SNN has exactly the lam a single-policy conversion gives it."""
    prepared = hc.calibrate(hc.prepare(small_cnn(), identity="maxpool"), loader())
    kw = dict(n=4, T=4, identity="maxpool")
    names = list(hc.convert(prepared, **kw).sites())
    assert names == ["identity", "2", "5"]  # the y = x site of the max pooling moved before its neuron, two ReLUs
    mixed = hc.convert(prepared, policy="opt,2=999,ident*=99.0", **kw)
    single = {p: hc.convert(prepared, policy=p, **kw).sites() for p in ("opt", "999", 99.0)}
    expected = {"2": "999", "5": "opt", "identity": 99.0}
    for name, site in mixed.sites().items():
        assert torch.equal(site.neuron.lam, single[expected[name]][name].neuron.lam), name
    assert not torch.equal(single["opt"]["2"].neuron.lam, single["999"]["2"].neuron.lam)
    with pytest.raises(ValueError, match=r"'\*\.nowhere' match no spiking site"):
        hc.convert(prepared, policy="opt,*.nowhere=999", **kw)
