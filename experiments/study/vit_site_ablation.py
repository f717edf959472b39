"""Which ViT sites cost "opt" its accuracy: swap one kind of site's thresholds between two policies.

    python experiments/study/vit_site_ablation.py [--model runs/vit_small.pt] [--limit 1000] [--site mix_in0]

Converts once per row from one calibration (identity = all, n = 4, T = 16): opt everywhere; opt
except the named sites (suffix ``--site``, default the softmax probabilities entering attn @ V)
taking 999's thresholds; 999 except those sites taking opt's. Prints SNN top-1 at T = 16 with and
without communication. docs/results.md (Table 4 section) quotes its numbers.
"""
from __future__ import annotations

import argparse

import hmtconv
from hmtconv.workload import DataOptions, load_workload


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/vit_small.pt")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--site", default="mix_in0", help="suffix of the site names to swap")
    args = parser.parse_args()
    work = load_workload(args.model, DataOptions(dataset="mnist", limit=args.limit, batch_size=250))
    prepared = hmtconv.calibrate(hmtconv.prepare(work.model, identity="all"), work.calib_loader)

    def snn(policy: str, communicate: bool = True):
        return hmtconv.convert(prepared, n=4, T=16, policy=policy, identity="all", communicate=communicate)

    lam = {policy: {name: site.neuron.lam for name, site in snn(policy).sites().items()} for policy in ("opt", "999")}
    print(f"| thresholds | communication | SNN top-1 % at T = 16 (ANN on these images: see below) |\n|---|---|---|")
    for base, other in (("opt", None), ("opt", "999"), ("999", "opt")):
        for communicate in (True, False):
            net = snn(base, communicate)
            if other is not None:  # the swapped sites take the other policy's thresholds
                for name, site in net.sites().items():
                    if name.endswith(args.site):
                        site.neuron.lam.copy_(lam[other][name])
            result = hmtconv.evaluate(net, work.eval_loader, ann=work.model, diagnostics=False)
            label = base if other is None else f"{base}, {args.site} sites from {other}"
            print(f"| {label} | {communicate} | {result.snn_accuracy[-1]:.2f} |", flush=True)
    print(f"ANN: {result.ann_accuracy:.2f} % on the first {result.samples} test images")


if __name__ == "__main__":
    main()
