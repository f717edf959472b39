"""Calibration cost: (a) one ``calibrate`` pass / the ANN forward pass over the same batches;
(b) peak memory of calibrating on a small and a large set, each in a fresh process.

    .venv/bin/python benchmarks/calibration.py [--models vgg_small resnet18_small resnet18 vgg16_bn vit_small]
        [--images 1024] [--batch 64] [--repeats 3] [--threads N]
        [--memory-models vgg_small resnet18] [--memory-images 1000 10000] [--skip-time | --skip-memory]

(a) Built-in models at MNIST size, torchvision models at 64 x 64, random weights (a ViT prepared
with identity = "all", the others with "none"); ``--images``
random images in batches made once, so loading is not timed. The ANN runs in eval mode under
no_grad; ``calibrate`` runs the same batches through one prepared model (statistics accumulate
over the repeats, which does not change the cost of a pass), timed side by side with the ANN;
``prepare`` is timed on its own. The prepared model pools with ``SlicedMaxPool2d`` (same values,
several times faster than ``nn.MaxPool2d`` on CPU) and computes its Linear layers by oneDNN
(faster than MKL's sgemm here): the column "ANN with our layers" divides by an ANN given the
same, so those gains are shown apart. The last column runs the prepared model with every
observer switched off: what the edited graph costs apart from the statistics.
Observers always gather per-layer and per-channel count, mean, M2 and maximum; the rows differ in
the histograms: per layer and per channel (``prepare``'s default: every policy at either
granularity), per layer only (``HistogramConfig(per_channel=False)``: the percentile policies and
opt-emp per layer), none (``histogram=None``: what ``convert(model, loader, policy="opt")`` gathers,
as for opt1500 and max).
(b) Each set size runs in a fresh process whose batches are generated one at a time (the data set
is never in memory); it reports its RSS after ``prepare``, its peak RSS during ``calibrate``
(Linux VmHWM, reset before calibrating) and its RSS after; freed tensors go straight back to the
system (timing.in_fresh_process), so RSS follows the live tensors. Target: no growth from the
small to the large set beyond about one data batch.
"""
from __future__ import annotations

import argparse
import json

import torch

import hmtconv
from end_to_end import build, identity_for, with_our_layers
from hmtconv.conversion.observers import ActivationObserver, HistogramConfig
from timing import in_fresh_process, peak_rss_mib, reset_peak, rss_mib, timed, timed_side_by_side

HISTOGRAMS = {"layer + channel (default)": HistogramConfig(),
              "layer only": HistogramConfig(per_channel=False),
              "none (opt, opt1500, max)": None}


def random_batches(images: int, batch: int, shape: tuple[int, ...]):
    """``(x, y)`` batches of random images, generated lazily."""
    for start in range(0, images, batch):
        n = min(batch, images - start)
        yield torch.rand(n, *shape), torch.randint(0, 10, (n,))


def time_table(args) -> None:
    print(f"\n{args.images} images in batches of {args.batch}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}, timed side by side; ratio = calibrate time / ANN forward time over the same batches")
    print("| model | input | histograms | prepare ms | ANN forward ms | calibrate ms | ratio "
          "| ratio, ANN with our layers | graph without observers / ANN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model, shape = build(name)
        ours = with_our_layers(model)
        batches = list(random_batches(args.images, args.batch, shape))
        for label, hist in HISTOGRAMS.items():
            identity = identity_for(name)
            t_prep = timed(lambda: hmtconv.prepare(model, identity=identity, histogram=hist), args.repeats)[0]
            prepared = hmtconv.prepare(model, identity=identity, histogram=hist)
            with torch.no_grad():
                (t_ann, t_ours, t_cal, t_graph), _ = timed_side_by_side(
                    [lambda: [model(x) for x, _ in batches], lambda: [ours(x) for x, _ in batches],
                     lambda: hmtconv.calibrate(prepared, batches), lambda: graph_alone(prepared, batches)],
                    args.repeats)
            print(f"| {name} | {'x'.join(map(str, shape))} | {label} | {1000 * t_prep:.1f} | {1000 * t_ann:.1f} | "
                  f"{1000 * t_cal:.1f} | {t_cal / t_ann:.2f} | {t_cal / t_ours:.2f} | {t_graph / t_ann:.2f} |",
                  flush=True)


def graph_alone(prepared, batches) -> None:
    """The prepared model on the batches with every observer's forward a no-op: what the edited
    graph (decomposed attention, sites, sliced max pooling, oneDNN Linear layers) costs apart from
    the statistics."""
    observers = [m for m in prepared.modules() if isinstance(m, ActivationObserver)]
    for observer in observers:
        observer.forward = lambda x: None
    try:
        for x, _ in batches:
            prepared(x)
    finally:
        for observer in observers:
            del observer.forward


def child(name: str, images: int, batch: int) -> None:
    """One fresh process: prepare, then calibrate on ``images`` lazily generated images."""
    torch.manual_seed(0)
    model, shape = build(name)
    prepared = hmtconv.prepare(model, identity=identity_for(name))
    reset_peak()
    before = rss_mib()
    hmtconv.calibrate(prepared, random_batches(images, batch, shape))
    print(json.dumps({"before": before, "peak": peak_rss_mib(), "after": rss_mib(), "shape": shape,
                      "batch_mib": batch * torch.Size(shape).numel() * 4 / 2**20}))


def memory_table(args) -> None:
    small, large = args.memory_images
    print(f"\nRSS (MiB) of a fresh process before calibrating, and its peak while calibrating on {small:,} and on "
          f"{large:,} lazily generated images (batch {args.batch}); growth = peak at {large:,} - peak at {small:,}")
    print(f"| model | input | one batch MiB | RSS before | peak, {small:,} images | peak, {large:,} images | growth "
          f"| RSS after, {small:,} / {large:,} |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.memory_models:
        runs = [in_fresh_process(__file__, name, images, args.batch, "--threads", torch.get_num_threads())
                for images in (small, large)]
        first, second = runs
        print(f"| {name} | {'x'.join(map(str, first['shape']))} | {first['batch_mib']:.2f} | {first['before']:.0f} | "
              f"{first['peak']:.0f} | {second['peak']:.0f} | {second['peak'] - first['peak']:+.1f} | "
              f"{first['after']:.0f} / {second['after']:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["vgg_small", "resnet18_small", "resnet18", "vgg16_bn", "vit_small"])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-models", nargs="+", default=["vgg_small", "resnet18"])
    parser.add_argument("--memory-images", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--threads", type=int, default=None)
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-time", action="store_true")
    skip.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "IMAGES", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    if not args.skip_time:
        time_table(args)
    if not args.skip_memory:
        memory_table(args)


if __name__ == "__main__":
    main()
