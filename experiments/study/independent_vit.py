"""hmtconv's ViT SNN against an independent implementation of the paper's ViT recipe.

    python experiments/study/independent_vit.py [--model runs/vit_small.pt] [--limit 2000] [--T 16]

tests/vit_reference.py runs torchvision's VisionTransformer from its state dict alone, one step at
a time, with literal neurons and its own eq. 29 thresholds (the oracle of
tests/test_vit_reference.py). Here both convert the trained vit_small (identity = all, n = 4,
opt, per-layer thresholds, calibration on the same 1,024 training images, float64 in the oracle)
and are evaluated on the first ``--limit`` test images, with and without communication: accuracy
at every t, and the largest relative difference between the two sets of thresholds.
docs/results.md (Table 4 section) quotes its output. About 5 minutes a run of the oracle here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hmtconv
from hmtconv.workload import DataOptions, load_workload

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference import optimal_lam  # noqa: E402
from vit_reference import simulate, site_moments  # noqa: E402

N = 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/vit_small.pt")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--T", type=int, default=16)
    args = parser.parse_args()
    work = load_workload(args.model, DataOptions(dataset="mnist", limit=args.limit, batch_size=250))
    model = work.model  # normalize -> torchvision VisionTransformer
    normalize, vit = model.normalize, model.net
    state = {k: v.detach().double() for k, v in vit.state_dict().items()}
    heads = vit.encoder.layers[0].self_attention.num_heads
    with torch.no_grad():
        moments = site_moments(state, heads, [normalize(x).double() for x, _ in work.calib_loader])
    theirs = [optimal_lam(mu, sigma, N, args.T, signed=True) for mu, sigma in moments.values()]
    print("| communication | implementation | ANN | " + " | ".join(f"t={t}" for t in (1, 2, 4, 8, args.T))
          + " |\n|---|---|---|---|---|---|---|---|")
    for communicate in (True, False):
        snn = hmtconv.convert(model, work.calib_loader, n=N, T=args.T, policy="opt", identity="all",
                              communicate=communicate)
        ours = [float(site.neuron.lam) for site in snn.sites().values()]
        result = hmtconv.evaluate(snn, work.eval_loader, ann=model)
        correct, total = torch.zeros(args.T), 0
        with torch.no_grad():
            for x, y in work.eval_loader:
                steps = simulate(state, heads, normalize(x).double(), dict(zip(moments, theirs)), N, args.T,
                                 communicate)
                correct += (steps.cumsum(0).argmax(-1) == y).sum(1)
                total += len(y)
        independent = (100 * correct / total).tolist()
        for label, acc in (("hmtconv", result.snn_accuracy), ("independent", independent)):
            print(f"| {'with' if communicate else 'without'} | {label} | {result.ann_accuracy:.2f} | "
                  + " | ".join(f"{acc[t - 1]:.2f}" for t in (1, 2, 4, 8, args.T)) + " |", flush=True)
    print(f"\nlargest relative threshold difference: "
          f"{max(abs(a - b) / b for a, b in zip(ours, theirs)):.2e} over {len(ours)} sites")


if __name__ == "__main__":
    main()
