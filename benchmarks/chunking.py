"""Chunked simulation for speed: ``evaluate`` time over T x ANN forward time, whole batches vs chunks.

    .venv/bin/python benchmarks/chunking.py [--models vgg_small vit_small resnet18] [--batch 256]
        [--T 4 16] [--chunks 16 32 64] [--repeats 3]

An SNN step holds ``[T*B, ...]`` activations; once they outgrow the last-level cache every
neuron and compensation pass is memory-bound, while chunks too small pay per-op overhead T times
over. Without ``max_batch`` or ``memory_budget``, ``evaluate`` on CPU simulates chunks of
``memory.cpu_chunk(T)`` samples (the "default" row); "whole" is one chunk per batch. Same inputs,
all rows timed side by side (alternating), median of repeats after a warm-up; results are equal
for every chunking (checked here). Built-in models at MNIST size, torchvision models at 64 x 64,
random weights.
"""
from __future__ import annotations

import argparse

import torch

import hmtconv
from end_to_end import build
from timing import timed_side_by_side


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg_small", "vit_small", "resnet18"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--T", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"ratio = evaluate time / (T x ANN forward time)")
    print("| model | T | " + " | ".join(["whole", "default"] + [f"chunk {c}" for c in args.chunks]) + " |")
    print("|---|---|" + "---|" * (2 + len(args.chunks)))
    for name in args.models:
        torch.manual_seed(0)
        model, shape = build(name)
        x, y = torch.rand(args.batch, *shape), torch.randint(0, 10, (args.batch,))
        identity = "all" if "vit" in name else "none"
        prepared = hmtconv.calibrate(hmtconv.prepare(model, identity=identity), [(x, y)])
        for T in args.T:
            snn = hmtconv.convert(prepared, n=4, T=T, policy="999", identity=identity)
            runs = [lambda: model(x)] + [
                (lambda c=c: hmtconv.evaluate(snn, [(x, y)], diagnostics=False, max_batch=c))
                for c in [args.batch, None] + args.chunks]
            with torch.no_grad():
                times, results = timed_side_by_side(runs, args.repeats)
            dicts = [r.to_dict() for r in results[1:]]
            assert all(d == dicts[0] for d in dicts), "chunking changed the results"
            print(f"| {name} | {T} | " + " | ".join(f"{t / (T * times[0]):.2f}" for t in times[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
