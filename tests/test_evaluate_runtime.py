"""The runtime around the simulation: errors mid-evaluation, state between calls, bad step counts."""
import gc

import pytest
import torch
from torch import nn

import hmtconv.conversion as hc


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def batches(sizes=(8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in sizes]


def nonfinite_site_inputs(snn, x) -> list[str]:
    """The sites whose input is not finite in the SNN's ANN mode, in run order (pre-hooks)."""
    bad = []
    hooks = [site.register_forward_pre_hook(lambda m, a, name=name: bad.append(name) if not torch.isfinite(a[0]).all()
                                            else None) for name, site in snn.sites().items()]
    snn.ann_forward(x)
    for h in hooks:
        h.remove()
    return bad


@pytest.mark.parametrize("diagnostics", [True, False])
@pytest.mark.parametrize("max_batch", [None, 3])
def test_nonfinite_snn_names_the_first_site_and_leaves_the_snn_clean(diagnostics, max_batch):
    """With diagnostics (the default) the re-run that names the site used to meet the monitor's
    hooks, which looked for ANN-mode outputs already used: IndexError instead of the message."""
    data = batches()
    snn = hc.convert(mlp(), data, n=2, T=4, policy="999")
    clean = hc.evaluate(snn, data, max_batch=max_batch, diagnostics=diagnostics)
    first, last = snn.net.get_submodule("0").weight, snn.net.get_submodule("4").bias
    saved = first.clone(), last.clone()
    x = data[0][0].clone()
    x[7] = 3e38  # with unit 0's weights 1: 4 * 3e38 at site 1's input, sample 7 only (the last chunk)
    with torch.no_grad():
        first[0] = 1.0
        last[0] = float("inf")  # every sample's logits, past the last site
    ann_mode = [nonfinite_site_inputs(snn, x[i:i + 1]) for i in range(8)]
    assert ann_mode[:7] == [[]] * 7 and ann_mode[7][0] == "1" and not torch.isfinite(snn(x)[:, :3]).all()
    for broken, where in (([(x, data[0][1])]), "the input of site 1"), ((data, "the layers after the last spiking site")):
        with pytest.raises(ValueError, match=f"evaluation batch 0: NaN or inf in the SNN, first at {where} "):
            hc.evaluate(snn, broken, max_batch=max_batch, diagnostics=diagnostics)
        assert all(not site._forward_hooks and not site._forward_pre_hooks for site in snn.sites().values())
        assert all(not site.neuron.sum_outputs for site in snn.sites().values())
    with torch.no_grad():
        first.copy_(saved[0])
        last.copy_(saved[1])
    assert hc.evaluate(snn, data, max_batch=max_batch, diagnostics=diagnostics) == clean  # nothing left behind


@pytest.mark.parametrize("steps", [0, -2, 2.0, True])
def test_snn_call_with_a_bad_step_count_says_so(steps):
    """snn(x, 0) failed with ZeroDivisionError, a negative T with a negative tensor size, a float
    or bool with a TypeError of Tensor.repeat."""
    data = batches()
    snn = hc.convert(mlp(), data, n=2, T=4, policy="999")
    with pytest.raises(ValueError, match=r"T \(time steps\) must be a positive integer"):
        snn(data[0][0], steps)
    with pytest.raises(ValueError, match=r"T \(time steps\) must be a positive integer"):
        hc.evaluate(snn, data, T=steps)


@pytest.mark.parametrize("n, signed, communicate", [(2, False, True), (4, True, True), (3, True, False), (6, False, True)])
def test_an_empty_batch_adds_nothing(n, signed, communicate):
    """An empty batch (B = 0) crashed the neuron's tensor path (amin of an empty tensor), which
    runs it since the CPU kernel declines empty inputs."""
    from hmtconv.neurons import HMTNeuron

    neuron = HMTNeuron(n, 0.3, signed=signed, communicate=communicate)
    neuron.sum_outputs = True
    out = neuron(torch.zeros(5, 0, 3))
    assert out.shape == (5, 0, 3) and neuron.output_sum.shape == (0, 3)
    assert torch.equal(neuron.spikes, torch.zeros(5, dtype=torch.float64))
    data = batches()
    snn = hc.convert(mlp(), data, n=n, T=4, policy="999", identity="all" if signed else "none",
                     communicate=communicate)
    empty = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    assert hc.evaluate(snn, data[:1] + empty + data[1:], ann=mlp()) == hc.evaluate(snn, data, ann=mlp())


def test_a_bfloat16_snn_averages_its_logits_in_float32():
    """Accuracy at t reads the mean of the logits of steps 1..t; summed in bfloat16 (8 bits of
    mantissa) those means round, and close classes swap places."""
    model = mlp()
    with torch.no_grad():
        model[4].bias.fill_(3.0)  # logits near 3, where bfloat16's spacing is 1/64
    data = batches((64, 64))
    snn = hc.convert(model, data, n=4, T=16, policy="999").to(torch.bfloat16)
    result = hc.evaluate(snn, data, diagnostics=False)
    correct = torch.zeros(16, dtype=torch.float64)
    for x, y in data:  # the reference: float64 running means of the same (bfloat16) per-step logits
        out = snn(x.to(torch.bfloat16)).double()
        mean = out.cumsum(0) / torch.arange(1, 17, dtype=torch.float64).view(-1, 1, 1)
        correct += (mean.argmax(-1) == y).sum(1)
    assert result.snn_accuracy == (100 * correct / 128).tolist()


def test_the_models_run_with_the_cyclic_garbage_collector_paused_and_restored():
    """Collections set off by a forward pass's short-lived objects traverse the whole SNN: calibrate
    and evaluate run the model with the collector off, and give back the state they found (on, or
    off by the user's choice), after an error too."""
    seen = []
    model = mlp()
    model[2].register_forward_pre_hook(lambda module, args: seen.append(gc.isenabled()))  # (copied along)
    with pytest.warns(UserWarning, match="forward hooks on 2 are copied"):
        prepared = hc.calibrate(hc.prepare(model), batches())
    assert seen == [False, False] and gc.isenabled()  # two calibration batches
    snn = hc.convert(prepared, T=3)  # (its shape and operation counts run the graph once or twice)
    seen.clear()
    hc.evaluate(snn, batches(), diagnostics=False)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        hc.evaluate(snn, batches(), diagnostics=False)
        assert not gc.isenabled()
    finally:
        gc.enable()
    snn.register_forward_pre_hook(lambda module, args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        hc.evaluate(snn, batches(), diagnostics=False)
    assert gc.isenabled()
