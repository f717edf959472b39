"""Where eq. 21's communication matters: the signed neuron's error with and without it.

    python experiments/study/communication.py [--model runs/vit_small.pt] [--images 64] [--policy opt]

1. Synthetic: a signed H-MT (n = 4, lam = 1, T = 16) whose input is a mean plus noise that
   changes sign from step to step. The ideal output of y = x over T steps is the mean input
   (clipped to the neuron's range); the table gives the mean |average output - that| with and
   without communication, by noise amplitude.
2. ViT-small (identity = all, n = 4, T = 16): every signed site's own input, captured during one
   run of the SNN, is replayed through the site's neuron with and without communication (the same
   thresholds, the same input). Per kind of site: the share of elements whose input changes sign
   over the steps, and the mean error of each neuron against the input's average.
docs/results.md (Table 4 section) quotes its output.
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch

import hmtconv
from hmtconv import HMTNeuron
from hmtconv.conversion.multistep import unfold
from hmtconv.workload import DataOptions, load_workload

STEPS, N = 16, 4


def error(neuron: HMTNeuron, x: torch.Tensor) -> float:
    """Mean |average output over the steps - average input clipped to the neuron's range|, in lam."""
    lam = neuron.lam.to(x.dtype)
    target = x.mean(0).clamp(-neuron.levels * lam, neuron.levels * lam)
    return ((neuron(x).mean(0) - target).abs() / lam).mean().item()


def synthetic() -> None:
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(20000, generator=g) * 2 - 1) * 10  # in units of lam, inside the range +-15
    print("| noise amplitude (lam) | error with communication (lam) | without | ratio |\n|---|---|---|---|")
    for amplitude in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        x = mean + amplitude * torch.randn(STEPS, mean.numel(), generator=g)
        with_, without = (error(HMTNeuron(N, 1.0, signed=True, communicate=c), x) for c in (True, False))
        print(f"| {amplitude:g} | {with_:.4f} | {without:.4f} | {without / max(with_, 1e-12):.2f} |")


def vit(model: str, images: int, policy: str) -> None:
    work = load_workload(model, DataOptions(dataset="mnist", limit=images, batch_size=images))
    snn = hmtconv.convert(work.model, work.calib_loader, n=N, T=STEPS, policy=policy, identity="all")
    stats = defaultdict(lambda: torch.zeros(4, dtype=torch.float64))  # elements, sign changes, errors

    def replay(name):
        def hook(module, args):
            x = unfold(args[0], STEPS).detach().clone()
            parent, last = name.split(".")[-2:]
            kind = f"{parent}.{last}" if last[0].isdigit() else last  # mlp.0_in, not 0_in
            row = stats[kind]
            row[0] += x[0].numel()
            row[1] += ((x > 0).any(0) & (x < 0).any(0)).sum().item()
            for i, communicate in ((2, True), (3, False)):
                neuron = copy.deepcopy(module.neuron)
                neuron.communicate, neuron.fanout = communicate, None
                row[i] += error(neuron, x) * x[0].numel()
        return hook

    hooks = [site.register_forward_pre_hook(replay(name)) for name, site in snn.sites().items()]
    with torch.no_grad():
        snn(next(iter(work.eval_loader))[0])
    for h in hooks:
        h.remove()
    print(f"\nViT-small, {policy}, identity = all, n = {N}, T = {STEPS}, first {images} test images")
    print("| site kind | elements per step | input changes sign | error with communication (lam) | without |"
          "\n|---|---|---|---|---|")
    for kind, (elements, changes, with_, without) in stats.items():
        print(f"| {kind} | {int(elements)} | {100 * changes / elements:.1f} % | {with_ / elements:.4f} | "
              f"{without / elements:.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/vit_small.pt")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--policy", default="opt")
    args = parser.parse_args()
    synthetic()
    vit(args.model, args.images, args.policy)


if __name__ == "__main__":
    main()
