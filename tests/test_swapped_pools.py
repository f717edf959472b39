"""Module swapping moves max pooling before the neuron of a ReLU that feeds it alone, as the traced
graph does: the same thresholds as the traced twin, and no move where anything else reads the ReLU."""
import pytest
import torch
import torchvision
from torch import nn

import hmtconv.conversion as hc
from hmtconv.conversion.fallback import CallSites
from hmtconv.conversion.swapped_pools import MovedReLU, PooledSite, pool_moves
from hmtconv.snn_io import load_snn, save_snn


def data(batches=2, size=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, size, size, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(batches)]


class Net(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> fc, behind a branch on values unless
    ``traceable``; ``variant`` makes something else read the first ReLU's output, or calls a module
    twice."""

    def __init__(self, variant: str = "", traceable: bool = False, in_place: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(64, 3)
        self.relu1, self.relu2 = nn.ReLU(inplace=in_place), nn.ReLU()
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2, padding=1)
        self.variant, self.traceable = variant, traceable

    def forward(self, x):
        h = self.conv1(x)
        r = self.relu1(h)
        other = self.pool1(h) if self.variant == "pooled_on_data" and x.abs().sum() > 0 else 0  # (before r's)
        fed = h if self.variant == "skipped_on_data" and x.abs().sum() > 0 else r
        p = self.pool1(fed) + other
        if not self.traceable and p.isnan().any():
            raise ValueError("NaN")
        extra = {"added": lambda: r.mean((2, 3), keepdim=True).amax(1, keepdim=True),
                 "view": lambda: r[:, :1, :6, :6], "input": lambda: h[:, :1, :6, :6].relu(),
                 "pooled_twice": lambda: self.pool1(self.relu1(h[:, :, :12, :12]))[:, :1],
                 "read_on_data": lambda: r[:, :, :6, :6] if x.abs().sum() > 0 else 0}.get(self.variant)
        if extra is not None:
            p = p + extra()
        return self.fc(self.pool2(self.relu2(self.conv2(p))).flatten(1))


def test_a_pool_fed_by_a_relu_alone_moves_before_its_neuron_with_the_traced_thresholds():
    model = Net().eval()
    snn = hc.convert(model, data(), n=4, T=8)
    assert not snn.report.traced and snn.report.unconverted == []
    assert list(snn.sites()) == ["pool1.relu", "pool2.relu"]
    assert isinstance(snn.net.relu1, MovedReLU) and isinstance(snn.net.pool1, PooledSite)
    traced = hc.convert(Net(traceable=True).eval(), data(), n=4, T=8)
    assert traced.report.traced
    lams = [[float(s.neuron.lam) for s in net.sites().values()] for net in (snn, traced)]
    assert lams[0] == pytest.approx(lams[1], rel=1e-6)
    x = data()[0][0]
    with torch.no_grad():
        assert torch.equal(snn.ann_forward(x), model(x))
        torch.testing.assert_close(snn(x).mean(0), traced(x).mean(0), rtol=1e-4, atol=1e-5)


def test_with_identity_maxpool_a_signed_site_takes_the_relus_place():
    """The paper's 16^{y=x} column: relu -> maxpool becomes y = x -> maxpool -> relu."""
    snn = hc.convert(Net().eval(), data(), n=4, T=8, identity="maxpool")
    traced = hc.convert(Net(traceable=True).eval(), data(), n=4, T=8, identity="maxpool")
    assert list(snn.sites()) == ["relu1.identity", "relu2.identity", "pool1.relu", "pool2.relu"]
    assert [s.signed for s in snn.sites().values()] == [True, True, False, False]
    assert sorted(float(s.neuron.lam) for s in snn.sites().values()) == \
        pytest.approx(sorted(float(s.neuron.lam) for s in traced.sites().values()), rel=1e-6)


def test_in_place_relus_under_identity_maxpool_keep_each_sites_own_error():
    """The y = x site's ANN-mode output is its input, which an in-place moved ReLU wrote over: its
    diagnostics read 0.17 instead of 0.004. Each site's error now equals the traced twin's."""
    errors = []
    for traceable in (False, True):
        model = Net(traceable=traceable, in_place=True).eval()
        result = hc.evaluate(hc.convert(model, data(), n=4, T=8, identity="maxpool"), data(), ann=model)
        errors.append(sorted(layer.mean_abs_error for layer in result.per_layer))
    assert errors[0] == pytest.approx(errors[1], rel=1e-4)


def test_per_channel_thresholds_after_a_moved_1d_pool_are_per_channel():
    """After a MaxPool1d the activation is [B, C, L]: the moved site's thresholds per C, as traced."""
    class Net1d(nn.Module):
        def __init__(self, traceable):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.relu, self.pool, self.fc = nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), \
                nn.Linear(24, 3)
            self.traceable = traceable

        def forward(self, x):
            if not self.traceable and x.isnan().any():
                raise ValueError("NaN")
            return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))
    batches = [(torch.randn(4, 2, 12, generator=torch.Generator().manual_seed(i)), torch.zeros(4, dtype=torch.long))
               for i in range(2)]
    swapped, traced = (hc.convert(Net1d(t).eval(), batches, n=4, T=4, granularity="channel") for t in (False, True))
    assert list(swapped.sites()) == ["pool.relu"] and swapped.sites()["pool.relu"].neuron.lam.shape == (4, 1)
    torch.testing.assert_close(swapped.sites()["pool.relu"].neuron.lam, traced.sites()["relu"].neuron.lam)


@pytest.mark.parametrize("variant, in_place", [("added", False), ("view", False), ("view", True), ("input", True),
                                               ("pooled_twice", False)])
def test_no_move_where_something_else_reads_the_relu_or_a_module_runs_twice(variant, in_place):
    """The first ReLU's output read by other code (a reduction, a view of it; with an in-place
    ReLU, its input read after it), or relu1 and pool1 called twice: only the second pair moves,
    and the SNN computes the model in ANN mode."""
    model = Net(variant, in_place=in_place).eval()
    x = data()[0][0]
    assert pool_moves(model, torch.zeros(1, 1, 12, 12), {"relu1", "relu2"}) == {"relu2": "pool2"}
    snn = hc.convert(model, data(), n=4, T=8)
    sites = list(snn.sites())
    assert "pool2.relu" in sites and not any(name.startswith("pool1") for name in sites)
    assert isinstance(snn.net.relu1, CallSites) == (variant == "pooled_twice")
    with torch.no_grad():
        assert torch.equal(snn.ann_forward(x), model(x))


@pytest.mark.parametrize("variant", ["read_on_data", "pooled_on_data", "skipped_on_data"])
def test_where_the_data_takes_another_path_than_the_zero_image_the_model_is_kept(variant):
    """Moved on the zero image's path; on the data's, other code reads the ReLU's output (it gets
    the float ReLU), or the pool gets other tensors too (pooled alone; the ReLU's output, whenever
    it comes, pooled before its neuron), or only another (the neuron never runs: calibration drops
    it): equal to the model in ANN mode, near it as a spiking network, and nothing kept after."""
    model = Net(variant).eval()
    assert pool_moves(model, torch.zeros(1, 1, 12, 12), {"relu1", "relu2"}) == {"relu1": "pool1", "relu2": "pool2"}
    snn = hc.convert(model, data(), n=8, T=64)
    assert ("pool1.relu" in snn.sites()) == (variant != "skipped_on_data")
    x = data()[1][0]
    with torch.no_grad():
        assert torch.equal(snn.ann_forward(x), model(x))
        assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    assert snn.net.relu1.input is snn.net.relu1.output is None  # (nothing kept after a forward)


def test_no_move_to_a_pool_of_its_own_forward_or_with_a_hook():
    """A subclass of MaxPool2d with a forward of its own, or a hook on the pool, need not commute
    with the ReLU: the neuron stays before them."""
    class Shifted(nn.MaxPool2d):
        def forward(self, x):
            return super().forward(x) - x.mean((1, 2, 3), keepdim=True)
    model = Net().eval()
    model.pool1 = Shifted(2)
    hook = model.pool2.register_forward_hook(lambda module, args, out: out - 0.2)
    assert pool_moves(model, torch.zeros(1, 1, 12, 12), {"relu1", "relu2"}) == {}
    hook.remove()  # (prepare warns that a hooked module it replaces loses its hooks)
    snn = hc.convert(model, data(), n=4, T=8)
    x = data()[0][0]
    with torch.no_grad():
        assert list(snn.sites()) == ["relu1", "pool2.relu"] and torch.equal(snn.ann_forward(x), model(x))


def test_no_move_where_the_model_returns_the_relus_output():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.pool = nn.ReLU(), nn.MaxPool1d(2)

        def forward(self, x):
            r = self.relu(x)
            return r, self.pool(r)
    assert pool_moves(Returns(), torch.zeros(1, 2, 4), {"relu"}) == {}


@pytest.mark.parametrize("identity", ["none", "all"])
def test_torchvisions_resnet_stem_moves_and_every_threshold_is_the_traced_graphs(identity):
    """ResNet18 behind a branch on values: the stem's in-place ReLU feeds its max pooling alone;
    with identity="all", the convolutions fed a neuron's spikes get no y = x site, as traced (19
    sites, not 38)."""
    class Branches(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) if x.sum() > -1e30 else -self.model(x)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    batches = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(2, dtype=torch.long))
               for i in range(2)]
    snn = hc.convert(Branches(model).eval(), batches, n=4, T=4, identity=identity)
    traced = hc.convert(model, batches, n=4, T=4, identity=identity)
    assert not snn.report.traced and "model.maxpool.relu" in snn.sites() and len(snn.sites()) == len(traced.sites())
    assert sorted(float(s.neuron.lam) for s in snn.sites().values()) == \
        pytest.approx(sorted(float(s.neuron.lam) for s in traced.sites().values()), rel=1e-6)


def test_an_snn_file_with_the_relus_site_before_its_pool_still_loads(tmp_path, monkeypatch):
    """Files written before the move hold the site under the ReLU's name: rebuilt so."""
    from hmtconv.conversion import fallback
    model = Net().eval()
    with monkeypatch.context() as patch:
        patch.setattr(fallback, "pool_moves", lambda *args: {})  # what such a version prepared
        old = hc.convert(model, data(), n=4, T=8)
    assert list(old.sites()) == ["relu1", "relu2"]
    torch.save(model, tmp_path / "model.pt")
    for snn, name in ((old, "old"), (hc.convert(model, data(), n=4, T=8, identity="maxpool"), "new")):
        save_snn(snn, tmp_path / f"{name}.safetensors", model=str(tmp_path / "model.pt"), num_classes=3)
        loaded, _ = load_snn(tmp_path / f"{name}.safetensors")
        assert list(loaded.sites()) == list(snn.sites())
        x = data()[0][0]
        assert torch.equal(loaded(x), snn(x))


def test_a_pool_returning_indices_is_a_clear_error():
    """Module swapping wraps every max pooling for spikes; one returning indices cannot be (it
    failed deep in the wrapper with "'tuple' object has no attribute '_base'")."""
    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, return_indices=True)
            self.fc = nn.Linear(72, 3)

        def forward(self, x):
            pooled, _ = self.pool(self.relu(self.conv(x)))
            if pooled.isnan().any():
                raise ValueError("NaN")
            return self.fc(pooled.flatten(1))
    with pytest.raises(ValueError, match=r"cannot convert pool \(MaxPool2d\): it returns indices, and fx cannot trace"):
        hc.convert(Indices().eval(), data())
