"""Running means exchanged between neurons and compensated ops (multilevel.py's ``takes_means``
and ``gives_means``, build.py's ``exchange_running_means``): the neuron does the pass the op
skips, and every result equals that of per-step values bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hmtconv
from hmtconv.conversion.compensated import Compensated, running_mean
from hmtconv.conversion.multistep import step_index
from hmtconv.neurons import HMTNeuron, MTNeuron
from test_cpu_kernel import LAYOUTS, needs_compiler, with_ties

def means_of(steps: torch.Tensor) -> torch.Tensor:
    """The running mean by its definition in float32: the sum from 0, step by step, over t."""
    sums, total = torch.empty_like(steps), torch.zeros_like(steps[0])
    for t, step in enumerate(steps):
        total = total + step
        sums[t] = total
    return sums / step_index(len(steps), steps)


def currents_of(means: torch.Tensor) -> torch.Tensor:
    """Step t's current ``t*m[t] - (t-1)*m[t-1]`` (each product rounded), the definition."""
    scaled = means * step_index(len(means), means)
    return torch.cat([scaled[:1], scaled[1:] - scaled[:-1]])


def run(neuron, x, in_place=False):
    out = neuron(x, out=x if in_place else None)
    return out, neuron.spikes, neuron.synops, neuron.output_sum


@needs_compiler
@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("forms", ["takes", "gives", "both"])
@pytest.mark.parametrize("kind,mode", [("hmt", "unsigned"), ("hmt", "signed"), ("hmt", "communicate"),
                                       ("mt", "signed")])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("in_place", [False, True])
def test_a_neuron_on_running_means_equals_it_on_per_step_values(monkeypatch, kernel, forms, kind, mode, layout,
                                                                 in_place):
    """``takes_means``: fed the running means of its currents, a neuron emits what it emits fed
    the currents; ``gives_means``: its output is the running mean of its per-step outputs. Spikes,
    synaptic operations and the outputs' sum unchanged; kernel and tensor path, strided views
    (run in memory order or through a copy), written over the input or not."""
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernel)
    g = torch.Generator().manual_seed(len(layout) + 3 * len(mode))
    view = LAYOUTS[layout]
    shape = view(torch.empty(9, 3, 10, 4, 8)).shape
    lam = torch.rand(shape[-1], generator=g) * 0.4 + 0.1
    signed = mode != "unsigned"

    def make():
        neuron = HMTNeuron(4, lam, signed=signed, communicate=mode == "communicate") if kind == "hmt" \
            else MTNeuron(3, lam * 3, signed=signed)
        neuron.fanout = torch.randint(0, 9, shape[2:], generator=g.manual_seed(5)).to(torch.float32)
        neuron.sum_outputs = True
        return neuron

    base = with_ties((9, 3, 10, 4, 8), 0.3, 15, g)  # (contiguous; the neurons see it through the view)
    neuron = make()
    neuron.takes_means, neuron.gives_means = forms in ("takes", "both"), forms in ("gives", "both")
    if neuron.takes_means:  # fed running means; the currents they stand for, by the definition
        base = means_of(base)
    currents = currents_of(view(base)) if neuron.takes_means else view(base)
    plain = make()
    expected = run(plain, currents.clone())
    assert (plain._kernel_plan is not None) == (kernel == "1") and expected[1].sum() > 0
    x = view(base.clone())
    out, spikes, synops, total = run(neuron, x, in_place)
    assert torch.equal(out, means_of(expected[0]) if neuron.gives_means else expected[0])
    assert torch.equal(spikes, expected[1]) and torch.equal(synops, expected[2]) and torch.equal(total, expected[3])
    if neuron.gives_means:  # what the compensated op it feeds would compute, in its own pass
        assert torch.equal(out.reshape(-1, *out.shape[2:]), running_mean(expected[0].reshape(-1, *out.shape[2:]), 9))


def flags(snn):
    sites = snn.sites()
    compensated = {name: m for name, m in snn.net.named_modules() if isinstance(m, Compensated)}
    return ({name for name, s in sites.items() if s.neuron.takes_means},
            {name for name, s in sites.items() if s.neuron.gives_means},
            {name for name, m in compensated.items() if m.emits_means},
            {name: m.means_given for name, m in compensated.items() if any(m.means_given)})


def per_step(snn, x):
    """``snn(x)`` with per-step values everywhere (``SNN.per_step_values``)."""
    with torch.no_grad(), snn.per_step_values():
        return snn(x)


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_a_vit_exchanges_running_means_at_every_neuron_beside_a_compensated_op(monkeypatch, kernel):
    """In a torchvision ViT (identity = all) the neurons after LayerNorm, softmax, the attention
    mix (through its heads' transpose and flatten), GELU (through a Dropout) and the final
    LayerNorm (through the class token's slice) take running means, the four attention operands'
    neurons give them; outputs and the evaluation equal those of per-step values bit for bit."""
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernel)
    torch.manual_seed(0)
    model = hmtconv.models.create_model("vit_small", in_channels=1, image_size=28, num_classes=10,
                                        num_layers=2).eval()
    data = [(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    snn = hmtconv.convert(model, data, n=4, T=6, policy="999", identity="all")
    takes, gives, emits, given = flags(snn)
    layers = [f"net.encoder.layers.encoder_layer_{i}." for i in range(2)]
    assert takes == {p + s for p in layers for s in ("self_attention.q_proj_in", "self_attention.mix_in0",
                                                     "self_attention.out_proj_in", "mlp.0_in", "mlp.3_in")} \
        | {"net.heads.head_in"}
    assert gives == {p + f"self_attention.{s}" for p in layers for s in ("scores_in0", "scores_in1", "mix_in0",
                                                                       "mix_in1")}
    assert emits == {p + s for p in layers for s in ("ln_1", "self_attention.softmax", "self_attention.mix", "ln_2",
                                                     "mlp.1")} | {"net.encoder.ln"}
    assert given == {p + f"self_attention.{s}": (True, True) for p in layers for s in ("scores", "mix")}
    x = data[0][0]
    exchanged = hmtconv.evaluate(snn, data, ann=model).to_dict()
    with snn.per_step_values():
        assert not any(flags(snn)[:3]) and not flags(snn)[3]
        assert hmtconv.evaluate(snn, data, ann=model).to_dict() == exchanged
    assert flags(snn) == (takes, gives, emits, given)  # (restored)
    with torch.no_grad():
        assert torch.equal(snn(x), per_step(snn, x))
    site = snn.sites()[layers[0] + "self_attention.scores_in0"]  # gives running means: inside, spikes
    seen = []
    hook = site.register_forward_hook(lambda module, args, out: seen.append(out / module.neuron.lam))
    per_step(snn, x)
    snn(x)
    hook.remove()
    levels = [bool((k - k.round()).abs().max() < 1e-3) and k.abs().max() < 15.01 for k in seen]
    assert levels == [True, False]  # levels k of k * lam; then means of them


class SharedReaders(nn.Module):
    """GELU's output read by a layer and by a slice; a layer's output by a product and a layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4), nn.Linear(4, 4)

    def forward(self, x):  # x: [B, tokens, 8]
        h = torch.nn.functional.gelu(self.fc1(x))
        q = self.fc3(h)
        return (self.fc2(h) + h[..., :4] + self.fc4(q) + q @ q.transpose(-1, -2)).mean(1)


def test_no_running_means_where_another_op_reads_the_same_tensor():
    """Per-step values wherever an op that needs them reads the tensor too."""
    torch.manual_seed(1)
    model = SharedReaders().eval()
    data = [(torch.randn(6, 4, 8), torch.randint(0, 4, (6,)))]
    snn = hmtconv.convert(model, data, n=4, T=5, policy="999", identity="all")
    # GELU's output feeds fc3's neuron (shared with fc2) and a slice; the neuron of q feeds fc4 and the
    # product; only q's transpose has a neuron of its own, which the product alone reads
    assert flags(snn) == (set(), {"matmul_in1"}, set(), {"matmul": (False, True)})
    with torch.no_grad():
        assert torch.equal(snn(data[0][0]), per_step(snn, data[0][0]))


@pytest.mark.parametrize("name", ["swin", "mobilenet_v3_small"])
def test_the_exchange_changes_no_result_of_window_attention_or_gated_convnets(name):
    """Swin's windows (reshapes that regroup rows: no exchange through them) and MobileNetV3's
    squeeze-and-excitation gates and hard-swishes (compensated before neurons)."""
    from test_convert_models import small_swin
    import torchvision

    torch.manual_seed(0)
    model = small_swin(False) if name == "swin" else torchvision.models.mobilenet_v3_small(num_classes=10)
    data = [(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    for bn in model.modules():  # BatchNorm statistics of the data (with the initial ones, activations vanish)
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        model.train()(data[0][0])
    model.eval()
    snn = hmtconv.convert(model, data, n=4, T=4, policy="999", identity="all")
    takes, gives, _, _ = flags(snn)
    assert takes and (gives or name != "swin")
    with torch.no_grad():
        assert torch.equal(snn(data[0][0]), per_step(snn, data[0][0]))
    assert all(site.neuron.spikes.sum() > 0 for name, site in snn.sites().items() if name in takes)
