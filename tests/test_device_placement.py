"""Tensors made where their inputs live. No GPU runs the tests: the meta device stands in for
CUDA (a tensor made on the CPU mid-computation meets a meta tensor as it would a CUDA one)."""
import pytest
import torch
from torch import nn

import hmtconv as hc
from hmtconv.conversion import energy
from hmtconv.conversion.evaluate import _SiteMonitor
from hmtconv.conversion.observers import ActivationObserver, HistogramConfig, check_finite
from hmtconv.conversion.snn import SNN
from hmtconv.theory.error import broadcast64

META = torch.device("meta")


def test_prepare_puts_the_observers_on_the_models_device():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval().to(META)
    prepared = hc.prepare(model, identity="all")
    assert {b.device for b in prepared.buffers()} == {META}


def test_adaptive_pool_windows_are_counted_on_the_activations_device():
    out, x = torch.empty(1, 2, 3, 3, device=META), torch.empty(1, 2, 7, 7, device=META)
    assert energy._adaptive_sum(out, x, 2).device == META


def test_theory_broadcasts_numbers_to_the_tensors_device():
    mu = torch.zeros(5, device=META)
    assert all(t.device == META for t in broadcast64(mu, 1.0, 4, torch.tensor(3.0)))
    assert all(t.device.type == "cpu" for t in broadcast64(1.0, 4))


@pytest.mark.parametrize("per_channel", [True, False])
def test_observers_gather_off_the_cpu_without_reading_the_device(per_channel):
    """The tensor path (every device but the CPU) reads nothing back per call: on meta any read
    fails. Whether the batch was finite is left for calibrate to read once per batch."""
    obs = ActivationObserver(signed=False, hist=HistogramConfig(per_channel=per_channel)).to(META)
    for shape in ((4, 3, 5, 5), (4, 3, 5, 5)):
        obs(torch.empty(shape, device=META))
    assert obs.shape == (3, 5, 5) and obs.unchecked.device == META
    assert {b.device for b in obs.buffers()} == {META}


def test_deferred_non_finite_batches_name_the_first_site_and_are_read_once():
    observers = [ActivationObserver(signed=True) for _ in range(3)]
    for obs, finite, label in zip(observers, (True, False, False), "abc"):
        obs.unchecked, obs.label = torch.tensor(finite), label
    with pytest.raises(ValueError, match="entering b during calibration"):
        check_finite(observers)
    assert all(obs.unchecked is None for obs in observers)
    check_finite(observers)  # nothing left to check


def test_a_non_finite_batch_adds_nothing_on_the_tensor_path():
    obs = ActivationObserver(signed=False)
    obs(torch.randn(8, 3))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    x = torch.randn(8, 3)
    x[1, 2] = float("nan")
    finite = obs._merge_batch(x, (0,), 8.0)
    obs._add_histograms(obs._output(x), 1, finite)
    assert not finite and all(torch.equal(v, obs.state_dict()[k]) for k, v in before.items())


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        from torchvision.models import VisionTransformer
        return VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                 num_classes=3).eval()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 3)).eval()


@pytest.mark.parametrize("kind, identity, communicate, granularity", [
    ("cnn", "none", True, "layer"), ("cnn", "maxpool", False, "channel"), ("vit", "all", True, "channel"),
    ("vit", "all", False, "layer")])
def test_the_simulation_stays_on_the_models_device_and_never_waits_for_it(kind, identity, communicate, granularity):
    """No GPU here, so the SNN runs on the meta device (shapes, no data; the neurons' tensor path):
    a tensor made on the CPU mid-forward fails there as it would on CUDA, and so does any step that
    reads a value back to the host (``.item()``, ``nonzero``, ``if tensor``), which on a GPU would
    stall every step of every neuron. The checked quotient of charge_ (CPU only) had one per step."""
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(tiny(kind), calib, n=4, T=3, identity=identity, communicate=communicate,
                     granularity=granularity).to("meta")
    y = snn(torch.randn(2, 3, 8, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 2, 3)


def test_an_snn_built_around_a_network_on_the_device_counts_there():
    """``convert`` of a model on CUDA builds the SNN there: its energy counts, and what evaluate
    adds the neurons' counts into, must be made there too (they were made on the CPU)."""
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    built = hc.convert(tiny("cnn"), calib, n=4, T=3)
    macs = {key: float(getattr(built, key)) for key in ("mac_ann", "mac_static", "mac_step")}
    snn = SNN(built.net.to("meta"), built.config, built.report, built.output_temporal, macs)
    assert {getattr(snn, key).device for key in macs} == {META}
    assert _SiteMonitor(snn, 3, compare=False).device == META


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny("cnn")

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else -self.body(x)  # data-dependent: module swapping


def test_neurons_without_fan_outs_count_spikes_without_reading_the_device():
    """A module-swapped model's neurons have no fan-outs: they counted spikes by bincount, which
    reads its output size back from the device (a stall per step; meta has no such kernel)."""
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(Untraceable().eval(), calib, n=4, T=3, policy="max")
    assert not snn.report.traced
    site = next(iter(snn.sites().values())).to(META)
    out = site(torch.randn(3 * 2, 4, 8, 8, device=META))
    assert out.device == META and site.neuron.spikes.device == META
