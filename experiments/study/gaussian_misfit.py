"""How far each site's inputs are from the Gaussian that "opt" assumes (eqs. 23-29).

    python experiments/study/gaussian_misfit.py [--models runs/vgg_small.pt runs/resnet18_small.pt runs/vit_small.pt]

For every spiking site: the quantization-plus-clipping error of eq. 24 over the site's own
calibration histogram at opt's threshold and at 999's, each divided by the least error any
threshold reaches on that histogram ("opt-emp"'s). 1 means the threshold is as good as the data
allows; opt far above 1 means the Gaussian fitted to the site's mean and variance misplaces its
threshold. Calibration as the CLI does it (1,024 random training images, --seed 0); n = 4 and the
T of each model's table in docs/results.md. docs/results.md (the ViT's Table 4 section) quotes it.
"""
from __future__ import annotations

import argparse
from statistics import median

import hmtconv
from hmtconv.conversion.empirical import empirical_error
from hmtconv.conversion.sites import ObservedActivation
from hmtconv.workload import DataOptions, load_workload

SETTINGS = {"vgg_small": ("none", 4), "resnet18_small": ("maxpool", 4), "vit_small": ("all", 16)}  # identity, T
N = 4


def misfit(path: str) -> None:
    work = load_workload(path, DataOptions(dataset="mnist", limit=1))
    name = next((key for key in SETTINGS if key in path), None)
    if name is None:
        raise SystemExit(f"{path}: the settings (identity, T) are known for {', '.join(SETTINGS)}: a path naming one")
    identity, T = SETTINGS[name]
    prepared = hmtconv.calibrate(hmtconv.prepare(work.model, identity=identity), work.calib_loader)
    observers = {site: m.observer for site, m in prepared.named_modules() if isinstance(m, ObservedActivation)}
    lams = {policy: {site: s.neuron.lam for site, s in hmtconv.convert(prepared, n=N, T=T, policy=policy,
                                                                        identity=identity).sites().items()}
            for policy in ("opt", "999", "opt-emp")}
    rows = []
    for site, observer in observers.items():
        counts, lo, hi = observer.histogram(per_channel=False)
        error = {p: empirical_error(counts, lo, hi, lams[p][site].double(), 2**N - 1, T).item() for p in lams}
        rows.append((site, error["opt"] / error["opt-emp"], error["999"] / error["opt-emp"]))
    print(f"\n{name}, identity = {identity}, n = {N}, T = {T}: error / the least error on the site's histogram")
    print("| site | opt | 999 |\n|---|---|---|")
    for site, opt, q999 in sorted(rows, key=lambda r: -r[1]):
        print(f"| {site} | {opt:.3g} | {q999:.3g} |")
    print(f"| median of {len(rows)} sites | {median(r[1] for r in rows):.3g} | {median(r[2] for r in rows):.3g} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[f"runs/{name}.pt" for name in SETTINGS])
    for path in parser.parse_args().models:
        misfit(path)


if __name__ == "__main__":
    main()
