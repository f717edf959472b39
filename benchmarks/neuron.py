"""Neuron speed: the closed-form H-MT step against the alternatives, on one input, in one process.

    .venv/bin/python benchmarks/neuron.py [--shape 16 32 64 32 32] [--n 8] [--threads N] [--keep-memory]
        [--device cuda]

(a) the literal greedy loop over steps and thresholds (the published neuron's algorithm, eqs. 14-18);
(b) SpikingJelly's multi-step IFNode (soft reset), if installed (the install line in benchmarks/requirements.txt),
    compared with our n = 1 neuron, the same model;
(c) a stateless elementwise floor/clamp: the lower bound of any per-step quantizer;
(d) our own tensor path (HMTCONV_CPU_KERNEL=0 / HMTCONV_GPU_KERNEL=0: what float64 takes, and CUDA
    without Triton) against the compiled CPU kernel (with ``--device cuda``: the Triton kernel), for
    the ReLU neuron and for the signed neuron with communication (the ViT's).
Median of repeats after a warm-up, all rows but (a) called in turn in each repeat (on CUDA each
call waits for the device); the outputs of (a), (d) and ours are checked equal.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import hmt_literal  # noqa: E402  (the tests' oracle is the faithful loop)

import hmtconv  # noqa: E402
from hmtconv import HMTNeuron  # noqa: E402
from timing import timed_side_by_side  # noqa: E402


KERNEL_SWITCHES = ("HMTCONV_CPU_KERNEL", "HMTCONV_GPU_KERNEL")


def tensor_path(neuron, x):
    """``neuron(x)`` with the compiled kernels switched off."""
    os.environ.update(dict.fromkeys(KERNEL_SWITCHES, "0"))
    try:
        return neuron(x)
    finally:
        for key in KERNEL_SWITCHES:
            del os.environ[key]


def spikingjelly_if():
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as error:
        print(f"(SpikingJelly not available: {error}; see benchmarks/requirements.txt for its install line)")
        return None
    return neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode="m")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 32, 64, 32, 32])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the Triton kernel against the rest")
    parser.add_argument("--keep-memory", action="store_true",
                        help="hmtconv.keep_freed_memory() first, as the CLI does: outputs then reuse freed memory "
                             "instead of faulting in fresh pages, and the neurons' own cost shows")
    args = parser.parse_args()
    if args.keep_memory:
        hmtconv.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, shape, device = args.n, tuple(args.shape), torch.device(args.device)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5).to(device)
    lam = 0.01

    def waited(fn):  # (CUDA calls return before the device is done)
        def call():
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return result
        return call
    ours = HMTNeuron(n, lam).to(device)
    signed = HMTNeuron(n, lam, signed=True, communicate=True).to(device)
    if_ours = HMTNeuron(1, 1.0).to(device)
    sj = spikingjelly_if()
    sj = sj if sj is None else sj.to(device)

    def run_sj():
        sj.reset()
        with torch.no_grad():
            return sj(x)
    candidates = [(f"H-MT closed form (ours), n = {n}", lambda: ours(x)),
                  ("stateless floor/clamp (lower bound)", lambda: torch.floor(x / lam).clamp_(0, 2**n - 1).mul_(lam)),
                  (f"H-MT n = {n}, our tensor path (no compiled kernel)", lambda: tensor_path(ours, x)),
                  (f"signed H-MT n = {n} with communication (ours)", lambda: signed(x)),
                  (f"signed H-MT n = {n} with communication, our tensor path", lambda: tensor_path(signed, x)),
                  ("IF: H-MT n = 1 (ours)", lambda: if_ours(x)),
                  *([("IF: SpikingJelly IFNode, multi-step", run_sj)] if sj is not None else [])]
    times, outputs = timed_side_by_side([waited(fn) for _, fn in candidates], args.repeats)
    out, t_ours = outputs[0], times[0]
    assert torch.equal(out, outputs[2]), "the tensor path differs from the kernel"
    assert torch.equal(outputs[3], outputs[4]), "the tensor path differs from the kernel (signed)"
    # the literal loop is orders of magnitude slower: timed on its own, with fewer repeats
    (t_loop,), ((ref, _),) = timed_side_by_side([waited(lambda: hmt_literal(x, lam, n))], max(1, args.repeats // 2))
    assert torch.equal(out, ref), "closed form differs from the literal loop"
    rows = [(label, seconds) for (label, _), seconds in zip(candidates, times)]
    rows.insert(1, (f"literal loop over steps and {n} thresholds (published algorithm)", t_loop))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"input {list(shape)} float32, {where}, median of {args.repeats}")
    print("| neuron | time s | relative to H-MT closed form |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / t_ours:.2f} |")


if __name__ == "__main__":
    main()
