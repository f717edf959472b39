"""2-process runs (gloo on CPU) against the 1-process run on the same data.

Ranks get contiguous runs of whole batches, so evaluation sums the very same per-batch rows as a
single process: every number is equal bit for bit. Calibration merges the ranks' statistics with
Chan's formula, so means and M2 agree to float64 rounding (checked to rtol 1e-12), counts, maxima
and histograms exactly; the float32 thresholds come out identical here.

Bit-for-bit equality needs the same number of intra-op threads per process: torchrun gives each
rank OMP_NUM_THREADS=1, and MKL's sgemm rounds some shapes differently with 2 threads (seen here:
2e-7 relative in one site's mean |ANN - SNN|), so the 1-process references run on one thread.
"""
import json
import re
import os
from contextlib import contextmanager
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import hmtconv.conversion as hc
from hmtconv.cli import main
from hmtconv.data import make_loader
from hmtconv.workload import shard_batches
from test_convert_models import Repeats

BATCH = 16


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def dataset(size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g))


class Padded(nn.Module):
    """Pads to a multiple of 3 only when needed: traced at the calibration size (tracing.py),
    on every rank, the one without data included."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(36, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if x.shape[-1] % 3:
            x = F.pad(x, (0, -x.shape[-1] % 3, 0, -x.shape[-2] % 3))
        return self.fc(F.relu(F.avg_pool2d(x, 3).flatten(1)))


# (calibration images, evaluation images): uneven shards (3 and 7 batches over 2 ranks), and runs
# with one batch where rank 1 has no data at all. Repeats (module swapping) calls its ReLU module
# once on rank 0's first calibration batch, twice on rank 1's: every rank must build the same
# sites (those of a zero image) and route each call alike, as one process does.
CASES = [(40, 100), (16, 10)]
CONFIGS = [dict(policy="opt"), dict(policy="opt", granularity="channel", identity="maxpool"), dict(policy="999")]


def run_cases() -> list[dict]:
    """Calibrate on this rank's share, convert, evaluate; the numbers every rank must agree on."""
    out = []
    for calib_size, eval_size in CASES:
        calib = make_loader(shard_batches(dataset(calib_size, 1), BATCH), BATCH)
        test = make_loader(shard_batches(dataset(eval_size, 2), BATCH), BATCH)
        for config in CONFIGS:
            prepared = hc.calibrate(hc.prepare(small_cnn(), identity=config.get("identity", "none")), calib)
            stats = {name: {k: v.clone() for k, v in site.observer.state_dict().items()}
                     for name, site in prepared.named_modules() if hasattr(site, "observer")}
            snn = hc.convert(prepared, T=3, **config)
            result = hc.evaluate(snn, test, ann=small_cnn()).to_dict()
            out.append({"stats": stats, "lam": {k: s.neuron.lam for k, s in snn.sites().items()}, "result": result})
        for model in (Padded(), Repeats()):
            snn = hc.convert(model.eval(), calib, T=3)
            assert snn.report.traced == (not isinstance(model, Repeats)), snn.report.trace_error
            out.append({"stats": {}, "lam": {k: s.neuron.lam for k, s in snn.sites().items()},
                        "result": hc.evaluate(snn, test).to_dict()})
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run_cases(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    with one_thread():
        single = run_cases()
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for one, two in zip(single, ranked):
            assert two["result"] == one["result"]  # accuracy, energy, spikes, per-layer: exact
            for name, stats in one["stats"].items():
                for key, value in stats.items():
                    if key.endswith(("mean", "m2")):
                        torch.testing.assert_close(two["stats"][name][key], value, rtol=1e-12, atol=1e-300)
                    else:  # counts, maxima, histograms
                        assert torch.equal(two["stats"][name][key], value), (name, key)
            for name, lam in one["lam"].items():
                assert torch.equal(two["lam"][name], lam), name


@pytest.mark.parametrize("length, world", [(100, 2), (100, 3), (16, 2), (5, 4)])
def test_shards_are_whole_batches_covering_everything_once(length, world, monkeypatch):
    from hmtconv import distributed

    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        shards.append(list(shard_batches(list(range(length)), BATCH)))
    assert [i for shard in shards for i in shard] == list(range(length))
    assert all(shard[0] % BATCH == 0 for shard in shards if shard)


def without_run_details(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("provenance", "seconds")}


def test_torchrun_evaluate_equals_single_process(tmp_path):
    model = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 36, 10)).eval(), model)
    common = ["evaluate", "--model", str(model), "--dataset", "mnist", "--limit", "100", "--calib-size", "40",
              "--batch-size", "16", "--T", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "hmtconv", *common, "--json", str(tmp_path / "two.json")]
    run = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    with one_thread():
        assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["images"] == two["samples"] == 100
    assert without_run_details(two) == without_run_details(one)
    assert run.stdout.count("| run") == 1  # only rank 0 prints the table
    assert run.stderr.count("whole pickled model") == 1  # and the warning


FAILING_HOOK = '''import os


def fail_on_rank_1(module, inputs):
    """Raises on rank 1's real images (not on the zero batch the model check runs)."""
    if os.environ["RANK"] == "1" and inputs[0].any():
        raise RuntimeError("bad data on rank 1")
'''


def test_torchrun_failure_on_one_rank_ends_every_rank_with_one_report(tmp_path):
    """Rank 1's model raises at its first evaluation batch; rank 0 evaluates its shard and learns
    of it at evaluate's gather: both exit by themselves (no signal from torchrun), non-zero, and
    the error is printed once, naming rank 1."""
    (tmp_path / "hook.py").write_text(FAILING_HOOK)
    sys.path.insert(0, str(tmp_path))
    try:
        import hook

        model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
        model.register_forward_pre_hook(hook.fail_on_rank_1)
        torch.save(model, tmp_path / "model.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hook")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "hmtconv", "evaluate", "--model", str(tmp_path / "model.pt"), "--code",
                str(tmp_path / "hook.py"), "--dataset", "mnist", "--limit", "48", "--calib-size", "32",
                "--batch-size", "16", "--T", "2", "--no-progress"]
    run = subprocess.run(torchrun, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert output.count("RuntimeError: bad data on rank 1") == 1, output
    assert "hmtconv (rank 1): error (a bug):" in output, output
    assert "[rank0]" not in output and "hmtconv (rank 0)" not in output, output  # rank 0 adds no error of its own
    # torchrun's summary: both ranks failed (torchrun may stop the last one to leave while it tears down)
    statuses = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?exitcode\s*:\s*(-?\d+)", output, re.DOTALL))
    assert set(statuses) == {"0", "1"} and "0" not in statuses.values(), output

