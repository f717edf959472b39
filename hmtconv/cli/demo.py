"""``hmtconv demo``: the README's main job, from nothing to a table on real MNIST.

Trains (or reuses the cached) built-in VGG-style CNN on real MNIST, converts it with H-MT
n = 4 and n = 8 under the "opt" and "999" policies from one calibration, evaluates on the
10,000 test images at T = 1..8, prints the table, writes JSON and plots.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..conversion import calibrate, convert, evaluate, prepare
from ..conversion.policies import depends_on_T, histograms_for
from ..report import (atomic_write_json, curves_table, jsonable, layers_table, plot_curves, plot_layers,
                      plot_tradeoff, provenance)
from ..train import trained_model
from ..workload import DataOptions, load_workload
from .options import MAX_N, ensure_writable, policy_value, positive_int, random_seed
from .registry import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for JSON and plots")
    parser.add_argument("--T", type=positive_int("--T"), default=8,
                        help="time steps (accuracy is reported at every t <= T)")
    parser.add_argument("--n", type=positive_int("--n", MAX_N), nargs="+", default=[4, 8], help="thresholds per neuron")
    parser.add_argument("--policy", type=policy_value, nargs="+", default=["opt", "999"], help="threshold policies")
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=3,
                        help="training epochs (the model is cached per recipe)")
    parser.add_argument("--limit", type=positive_int("--limit"), default=None,
                        help="evaluate on the first N test images (default all)")
    parser.add_argument("--seed", type=random_seed, default=0, help="training and data seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def accuracy_by_T(prepared, work, n: int, policy: str, T_max: int, diagnostics: bool, progress: bool) -> dict:
    """Accuracy and energy at T = 1..T_max: one run of T_max steps for T-independent policies,
    one conversion per T (read at t = T) for policies optimized for a given T ("opt")."""
    if not depends_on_T(policy):
        snn = convert(prepared, n=n, T=T_max, policy=policy)
        return evaluate(snn, work.eval_loader, ann=work.model, diagnostics=diagnostics, progress=progress).to_dict()
    per_T = [evaluate(convert(prepared, n=n, T=T, policy=policy), work.eval_loader, ann=work.model,
                      diagnostics=diagnostics and T == T_max, progress=progress).to_dict()
             for T in range(1, T_max + 1)]
    record = per_T[-1]  # its figures by step become each T's own at t = T
    for key in ("snn_accuracy", "agreement", "energy_ratio", "spikes_cumulative", "synops_cumulative"):
        if record[key] is not None:
            record[key] = [r[key][-1] for r in per_T]
    record["thresholds_per_T"] = True
    return record


@register_command("demo", help="Train a VGG-style CNN on real MNIST (cached), convert it with H-MT n = 4 and 8 "
                  "under opt and 999, and report accuracy and energy at every T.", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> None:
    ensure_writable(args.out / "results.json")  # fail now, not after training
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    checkpoint = trained_model("vgg_small", "mnist", epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    data = DataOptions(dataset="mnist", limit=args.limit, seed=args.seed)
    work = load_workload(str(checkpoint), data)
    # one calibration serves every conversion (per layer: the demo's thresholds are)
    prepared = calibrate(prepare(work.model, histogram=histograms_for(args.policy, per_channel=False),
                                 example_inputs=work.example_inputs()), work.calib_loader)
    runs, records = {}, []
    for n in args.n:
        for policy in args.policy:
            record = accuracy_by_T(prepared, work, n, policy, args.T, diagnostics=not records,
                                   progress=not args.no_progress)
            label = f"n={n} {policy}"
            runs[label] = record
            records.append(record)
            print(f"  done: {label}: {record['snn_accuracy'][-1]:.2f}% at T = {args.T} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nVGG-style CNN on real MNIST, {work.eval_images} test images, calibrated on {work.calib_images} "
          f"training images; ANN {records[0]['ann_accuracy']:.2f}%.\nH-MT SNN accuracy (%) and energy ratio "
          f"E_SNN/E_ANN at T steps ('opt' thresholds are optimized for each T):\n")
    print(curves_table(runs).replace("| t=", "| T="))
    print()
    print(layers_table(records[0]))
    out = args.out
    atomic_write_json(out / "results.json", {"model": work.source, "checkpoint": str(checkpoint), "runs": records,
                                             "provenance": provenance(jsonable(vars(args)), seed=args.seed,
                                                                      device="cpu")})
    plot_curves(runs, out / "curves.png", title="VGG-style CNN on MNIST: H-MT SNN vs ANN", xlabel="T (time steps)")
    plot_layers(records[0], out / "layers.png", title=f"n={args.n[0]} {args.policy[0]}, T={args.T}")
    plot_tradeoff([{"label": label, "accuracy": a, "energy_ratio": e}
                   for label, r in runs.items() for a, e in zip(r["snn_accuracy"], r["energy_ratio"])],
                  out / "tradeoff.png", title=f"Accuracy vs energy ratio over T = 1..{args.T}")
    print(f"\nwrote {out}/results.json, curves.png, layers.png, tradeoff.png ({time.perf_counter() - start:.0f} s)")
