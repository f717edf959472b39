"""Chunked simulation under a memory budget: identical results, and the estimate behind the chunks."""
import numpy as np
import pytest
import torch
from torch import nn

import hmtconv.conversion as hc
from hmtconv.conversion.memory import MARGIN, chunk_size, format_bytes, parse_bytes

from test_convert_snn import loader, small_cnn


def _same(a, b):
    a, b = a.to_dict(), b.to_dict()
    # |ANN - SNN| compares with a float32 ANN pass per chunk, whose convolutions may round differently
    for la, lb in zip(a.pop("per_layer"), b.pop("per_layer")):
        assert la.pop("mean_abs_error") == pytest.approx(lb.pop("mean_abs_error"), rel=1e-6)
        assert la == lb
    assert a == b


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_chunked_evaluation_equals_whole_batches(granularity):
    model, data = small_cnn(), loader(batch=10)
    snn = hc.convert(model, data, n=3, T=6, policy="999", granularity=granularity)
    whole = hc.evaluate(snn, data, ann=model)
    x = data[0][0]
    assert torch.equal(snn(x), torch.cat([snn(part) for part in x.split(3)], 1))
    _same(whole, hc.evaluate(snn, data, ann=model, max_batch=3))
    _same(whole, hc.evaluate(snn, data, ann=model, memory_budget=int(snn.activation_bytes(6) * 4.5)))


def test_chunked_evaluation_of_a_module_swapped_model(monkeypatch):
    class Untraceable(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = small_cnn()

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else -self.body(x)

    model, data = Untraceable().eval(), loader(batch=10)
    snn = hc.convert(model, data, n=4, T=4, policy="999")
    assert not snn.report.traced
    assert snn.activation_bytes(8) == pytest.approx(2 * snn.activation_bytes(4))
    _same(hc.evaluate(snn, data, ann=model), hc.evaluate(snn, data, ann=model, max_batch=4))
    # its estimate adds up every layer's output (far above the peak): the CPU default does not read it
    monkeypatch.setattr(hc.memory, "available_memory", lambda: int(snn.activation_bytes(4) / 2))
    hc.evaluate(snn, data, diagnostics=False)


def test_memory_budget_of_a_module_swapped_float64_model():
    """The leaf-output estimate runs the SNN on a zero image of the model's dtype: float64 twice
    float32's bytes, and the budget's chunks give the whole batches' results."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else -self.body(x)

    data = loader(batch=10)
    single = hc.convert(Untraceable().eval(), data, n=4, T=4, policy="999")
    model = Untraceable().double().eval()
    data = [(x.double(), y) for x, y in data]
    snn = hc.convert(model, data, n=4, T=4, policy="999")
    assert not snn.report.traced
    assert snn.activation_bytes(4) == pytest.approx(2 * single.activation_bytes(4))
    _same(hc.evaluate(snn, data, ann=model, max_batch=10),
          hc.evaluate(snn, data, ann=model, memory_budget=int(snn.activation_bytes(4) * 3.5)))


def test_memory_budget_sets_the_chunk(monkeypatch):
    model, data = small_cnn(), loader(batch=10)
    snn = hc.convert(model, data, n=2, T=5, policy="999")
    sizes = []
    real = type(snn).forward
    monkeypatch.setattr(type(snn), "forward", lambda self, x, T=None: sizes.append(x.shape[0]) or real(self, x, T))
    hc.evaluate(snn, data[:1], diagnostics=False, memory_budget=int(snn.activation_bytes(5) * 3.5))
    assert sizes == [3, 3, 3, 1]
    sizes.clear()
    with pytest.warns(UserWarning, match="budget of 1 B; simulating one sample at a time"):
        hc.evaluate(snn, data[:1], diagnostics=False, memory_budget=1)
    assert sizes == [1] * 10
    with pytest.raises(ValueError, match="not both"):
        hc.evaluate(snn, data, max_batch=2, memory_budget="1GB")
    with pytest.raises(ValueError, match="positive integer"):
        hc.evaluate(snn, data, max_batch=0)
    hc.evaluate(snn, data[:1], diagnostics=False, memory_budget=np.int64(2**30))  # numpy numbers are numbers
    for bad in (float("nan"), float("inf"), 0.5, -3, True, [1]):
        with pytest.raises(ValueError, match=r"memory_budget must be a number of bytes \(at least 1\)"):
            hc.evaluate(snn, data, memory_budget=bad)


@pytest.mark.parametrize("T, sizes", [(16, [32, 32, 32, 4]), (4, [64, 36]), (64, [32, 32, 32, 4])])
def test_cpu_default_chunks_by_T_with_equal_results(monkeypatch, T, sizes):
    """Without max_batch or memory_budget, a CPU batch runs in chunks of 512 // T samples clamped to
    32..64 (memory.cpu_chunk), with results equal to whole batches."""
    model, data = small_cnn(), loader(batch=100, batches=1)
    snn = hc.convert(model, data, n=2, T=T, policy="999")
    whole = hc.evaluate(snn, data, max_batch=100)
    seen = []
    real = type(snn).forward
    monkeypatch.setattr(type(snn), "forward", lambda self, x, T=None: seen.append(x.shape[0]) or real(self, x, T))
    _same(whole, hc.evaluate(snn, data))
    assert seen == sizes


def test_cpu_default_chunks_fit_the_memory_available(monkeypatch):
    """A long T: chunks that half the available memory holds, and one sample that does not fit at
    all is a clear error (the out-of-memory killer ended the process without a word)."""
    assert hc.memory.available_memory() > 0  # (Linux: MemAvailable)
    model, data = small_cnn(), loader(batch=10, batches=1)
    snn = hc.convert(model, data, n=2, T=8, policy="999")
    whole = hc.evaluate(snn, data, max_batch=10)
    seen = []
    real = type(snn).forward
    monkeypatch.setattr(type(snn), "forward", lambda self, x, T=None: seen.append(x.shape[0]) or real(self, x, T))
    monkeypatch.setattr(hc.memory, "available_memory", lambda: int(snn.activation_bytes(8) * 8.5))
    _same(whole, hc.evaluate(snn, data))
    assert seen == [4, 4, 2]
    monkeypatch.setattr(hc.memory, "available_memory", lambda: int(snn.activation_bytes(8) * 0.75))
    with pytest.raises(ValueError, match=r"one sample at T=8 needs about .* more than the .* of memory available"):
        hc.evaluate(snn, data)


def test_available_memory_reads_meminfo_in_bytes(monkeypatch, tmp_path):
    import builtins
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8 kB\nMemAvailable:       2 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                         *a, **k))
    assert hc.memory.available_memory() == 2048
    meminfo.write_text("MemTotal:       8 kB\n")  # (older kernels): unknown
    assert hc.memory.available_memory() is None


def test_estimate_of_a_chain_by_hand():
    """conv(1->4) -> ReLU -> conv(4->2) -> ReLU on 6x6 images, float32. In a chain a value dies at
    its consumer, so at each node the live values are its input and its output; a neuron adds 6
    per-step tensors of its size. Static: the image and the first conv (before any neuron), which a
    ToTime node repeats T times for the first neuron."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU()).eval()
    snn = hc.convert(model, [(torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))], n=2, T=3, policy="max")
    image, c1, c2 = 36 * 4, 4 * 36 * 4, 2 * 36 * 4  # bytes per sample
    T = 7
    candidates = [image,                     # placeholder
                  image + c1,                # conv1 (static)
                  c1 + T * c1,               # ToTime: static input, temporal copy
                  T * c1 + T * c1 + 6 * c1,  # neuron 1: input, output, scratch
                  T * c1 + T * c2,           # conv2
                  T * c2 + T * c2 + 6 * c2,  # neuron 2
                  T * c2]                    # output
    assert snn.activation_bytes(T) == pytest.approx(MARGIN * max(candidates), rel=1e-12)


def test_parse_bytes_and_chunk_size():
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("1000") == 1000 and parse_bytes(" 2 k ") == 2048
    assert [format_bytes(b) for b in (1, 1536, 5 * 2**20, 3 * 2**40)] == ["1 B", "1.5 KiB", "5 MiB", "3 TiB"]
    for bad in ("", "-1GB", "4 parsecs", "GB", "0", "0.5", "0.0005KB"):  # (under a byte: an error after calibration)
        with pytest.raises(ValueError, match="cannot read memory size"):
            parse_bytes(bad)
    assert chunk_size(100.0, 1050, batch=64) == 10 and chunk_size(1e12, 10, batch=64) == 1
    assert chunk_size(1.0, 10**9, batch=64) == 64


class _Untraceable(nn.Module):  # data-dependent control flow: module swapping
    def __init__(self):
        super().__init__()
        self.body = small_cnn()

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else -self.body(x)


@pytest.mark.parametrize("make", [small_cnn, _Untraceable], ids=["traced", "module-swapped"])
def test_estimate_of_an_snn_cast_after_conversion_is_that_of_one_converted_in_its_dtype(make):
    """A float32 SNN cast to float64 holds float64 activations; its estimate (and so the chunks of
    a memory budget) stayed that of float32, half the memory it uses."""
    data = loader(batch=10)
    cast = hc.convert(make().eval(), data, n=2, T=4, policy="999")
    float32 = cast.activation_bytes(4)
    cast.double()
    native = hc.convert(make().double().eval(), [(x.double(), y) for x, y in data], n=2, T=4, policy="999")
    assert cast.activation_bytes(4) == pytest.approx(native.activation_bytes(4), rel=1e-12)
    assert cast.activation_bytes(4) == pytest.approx(2 * float32, rel=1e-12)
    assert cast.float().activation_bytes(4) == pytest.approx(float32, rel=1e-12)
