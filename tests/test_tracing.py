"""The tracers (tracing.py): models whose forward branches on sizes in Python trace at the
example's image size, still take any batch size, convert like any traced model, and refuse
another image size; branches on the batch size or on values still fall back to module swapping;
item assignment traces."""
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import hmtconv.conversion as hc
from hmtconv.conversion.tracing import NotTraceable, trace


def loader(shape, batches=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]


class Patches(nn.Module):
    """MobileViT-style: pads to a multiple of the patch size only when needed, folds patches with
    sizes read from ``x.shape`` (batch-dependent ``B`` included), loops over groups of channels
    (``range`` of a size, iterating a ``split``), measures a tuple with ``len``, branches on
    the kind of device and reads a number with ``.item()``."""

    def __init__(self, patch=2, channels=4):
        super().__init__()
        self.patch, self.conv, self.fc = patch, nn.Conv2d(3, channels, 3, padding=1), nn.Linear(channels, channels)
        self.head, self.gain = nn.Linear(channels, 10), nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        x = F.relu(self.conv(x))
        B, C, H, W = x.shape
        if H % self.patch or W % self.patch:
            x = F.pad(x, (0, -W % self.patch, 0, -H % self.patch))
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = x.reshape(B, C, h, self.patch, w, self.patch).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, C)
        groups = tokens.split(max(1, C // 2), dim=-1)
        mixed = torch.cat([g.relu() for g in groups], -1) if len(groups) > 1 else groups[0]
        for _ in range(tokens.shape[1] // tokens.shape[1]):  # once, counted from sizes
            mixed = F.relu(self.fc(mixed))
        if x.device.type != "meta":  # EfficientViT-MIT asks for the kind of device in Python
            mixed = mixed + torch.zeros(mixed.shape[-1], device=x.device)
        return self.head(mixed.mean(1)) * self.gain.item()  # no value on meta tensors: left symbolic


class BranchOnBatch(Patches):
    def forward(self, x):
        return super().forward(x) if x.shape[0] > 1 else super().forward(x) * 2


class BranchOnValues(Patches):
    def forward(self, x):
        return super().forward(x) if x.mean() > -10 else -super().forward(x)


def test_plain_fx_fails_and_the_example_makes_it_trace_for_any_batch():
    torch.manual_seed(0)
    model, x = Patches().eval(), torch.randn(4, 3, 7, 9)  # odd sizes: the padding branch is taken
    with pytest.raises(NotTraceable, match="control flow"):
        trace(model)
    gm, sized = trace(model, x)
    assert sized
    for batch in (1, 2, 5, 12):  # not just the two batch sizes the tracer ran: B stays symbolic
        y = torch.randn(batch, 3, 7, 9)
        assert torch.equal(gm(y), model(y))
    with pytest.raises(RuntimeError):  # the graph is the one of 7 x 9 images
        gm(torch.randn(2, 3, 8, 8))
    devices = [n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "device" and n.users]
    assert devices  # torch.zeros(..., device=x.device) reads the device at run time: the SNN can move


def test_a_plainly_traceable_model_is_not_specialized():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 6, 6))
    assert trace(model.eval(), torch.randn(2, 3, 6, 6))[1] is False


def test_convert_traces_at_the_calibration_size_and_checks_it():
    torch.manual_seed(0)
    model, data = Patches().eval(), loader((3, 7, 9))
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=8, T=T, policy="max")
        x = data[0][0]
        errors[T] = ((snn(x).mean(0) - model(x)).abs().mean() / model(x).abs().mean()).item()
    assert snn.report.traced and snn.report.trace_error is None and snn.report.unconverted == []
    assert errors[64] < 0.5 * errors[4] and errors[64] < 0.05
    prepared = hc.prepare(model, example_inputs=data[0])
    with pytest.raises(ValueError, match=r"calibration batch 0 has images of shape \[3, 8, 8\].*traced at \[3, 7, 9\]"):
        hc.calibrate(prepared, loader((3, 8, 8)))
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\] but the SNN was calibrated on \[3, 7, 9\]"):
        hc.evaluate(snn, loader((3, 8, 8)))


def test_convert_peeks_at_a_one_pass_loader_without_losing_its_first_batch():
    """convert takes its example from the first calibration batch; from a generator that batch
    must still be calibrated (it holds the largest values, so "max" thresholds show it)."""
    torch.manual_seed(0)
    model, data = Patches().eval(), loader((3, 7, 9))
    data[0] = (data[0][0] * 3, data[0][1])
    explicit = hc.convert(hc.calibrate(hc.prepare(model, example_inputs=data[0]), data), n=4, T=4, policy="max")
    peeked = hc.convert(model, (batch for batch in data), n=4, T=4, policy="max")
    without_first = hc.convert(hc.calibrate(hc.prepare(model, example_inputs=data[0]), data[1:]), n=4, T=4, policy="max")
    lams = [{k: v for k, v in snn.state_dict().items() if k.endswith("lam")} for snn in (explicit, peeked, without_first)]
    assert lams[0] and all(torch.equal(lams[0][k], lams[1][k]) for k in lams[0])
    assert any(not torch.equal(lams[0][k], lams[2][k]) for k in lams[0])


@pytest.mark.parametrize("cls", [BranchOnBatch, BranchOnValues])
def test_branches_on_the_batch_size_or_on_values_still_fall_back(cls):
    torch.manual_seed(0)
    model, data = cls().eval(), loader((3, 7, 9))
    snn = hc.convert(model, data, n=4, T=4, policy="max", identity="all")  # (the fallback only swaps modules)
    assert not snn.report.traced
    assert "at the example's image size" in snn.report.trace_error


@pytest.mark.filterwarnings("ignore:constant activations")  # one token left in the last stage at 40 px
def test_timm_mobilevit_traces_at_its_size_and_approaches_its_ann():
    """timm's MobileViT (pads and folds patches by Python arithmetic on sizes) fell back to module
    swapping, its attention left in float; traced at the calibration size, everything converts."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=10, pretrained=False).eval()
    data = loader((3, 40, 40), batches=1, batch=2)
    errors = {}
    for T in (4, 32):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        x, ref = data[0][0], model(data[0][0])
        errors[T] = ((snn(x).mean(0) - ref).abs().mean() / ref.abs().mean()).item()
    assert snn.report.traced and snn.report.unconverted == []
    assert torch.allclose(snn.ann_forward(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert errors[32] < 0.5 * errors[4]


class AssignedScores(nn.Module):
    """MViTv2-style item assignment after spiking neurons: a relative-position term added to part
    of the attention scores in place, and half of a zero buffer filled from an activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.q, self.k, self.rel = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.head = nn.Linear(5 * 6, 10)

    def forward(self, x):  # [B, 5, 6]
        h = torch.relu(self.fc(x))
        scores = self.q(h) @ self.k(h).transpose(1, 2)
        scores[:, 1:, 1:] = scores[:, 1:, 1:] + self.rel(h[:, 1:])
        out = scores.softmax(-1) @ h
        half = torch.zeros_like(out)
        half[..., :3] = out[..., :3]
        return self.head((out + half).flatten(1))


def test_item_assignment_after_neurons_traces_and_converges():
    model, data = AssignedScores().eval(), loader((5, 6), batches=1, batch=8)
    x, ref = data[0][0], model(data[0][0])
    errors = {}
    for T in (4, 64):
        snn = hc.convert(model, data, n=8, T=T, policy="max", identity="all")
        errors[T] = ((snn(x).mean(0) - ref).abs().mean() / ref.abs().mean()).item()
    assert snn.report.traced and snn.report.trace_error is None and snn.report.unconverted == []
    assert torch.allclose(snn.ann_forward(x), ref, atol=1e-5)
    assert errors[64] < 0.5 * errors[4] and errors[64] < 0.05
