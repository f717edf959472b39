"""Memory bound of chunked simulation: peak RSS of ``evaluate``, whole batch vs ``memory_budget``.

Each setting runs ``evaluate`` on one batch in a fresh process; results must not depend on chunking.

    .venv/bin/python benchmarks/memory.py [--model resnet18] [--T 64] [--n 4] [--batch 32]
        [--budgets 256MB 128MB 64MB] [--repeats 1] [--threads N] [--glibc-default]

A torchvision model at 3 x 64 x 64 with random weights, calibrated on the one random batch it is
then evaluated on (policy "999", diagnostics off). Each row is a fresh process that reports its
RSS before ``evaluate`` and its peak RSS during it (Linux VmHWM, reset before; a warm-up call and
``--repeats`` timed calls). chunk = ``chunk_size(snn.activation_bytes(T), budget, batch)``, the
samples simulated at once; estimate = chunk x ``activation_bytes(T)``, the activations that
hmtconv.conversion.memory predicts (weights and the data batch come on top, in "RSS before").
"same results" compares snn_accuracy, spikes_per_sample and energy_ratio with the whole-batch run.
Children free tensors straight back to the system (timing.in_fresh_process), so RSS follows the
live tensors; ``--glibc-default`` shows the default allocator instead (faster, higher and noisier
peaks). The defaults keep the whole batch near 0.4 GiB of activations (vgg16_bn: 4.2 GiB at T = 64).
"""
from __future__ import annotations

import argparse
import json

import torch

import hmtconv
from end_to_end import build, identity_for
from hmtconv.conversion.memory import chunk_size, parse_bytes
from timing import in_fresh_process, peak_rss_mib, reset_peak, rss_mib, timed

COMPARED = ("snn_accuracy", "spikes_per_sample", "energy_ratio")


def child(name: str, T: int, n: int, batch: int, budget: str, repeats: int) -> None:
    """One fresh process: calibrate and convert, then evaluate one batch (budget "none": whole)."""
    torch.manual_seed(0)
    model, shape = build(name)
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    identity = identity_for(name)
    snn = hmtconv.convert(hmtconv.calibrate(hmtconv.prepare(model, identity=identity), [(x, y)]), n=n, T=T,
                          policy="999", identity=identity)
    per_sample = snn.activation_bytes(T)
    budget = None if budget == "none" else budget
    chunk = batch if budget is None else chunk_size(per_sample, parse_bytes(budget), batch)
    reset_peak()
    before = rss_mib()
    # no budget: the whole batch at once (max_batch), not evaluate's default CPU chunks
    seconds, result = timed(lambda: hmtconv.evaluate(snn, [(x, y)], diagnostics=False, memory_budget=budget,
                                                     max_batch=batch if budget is None else None), repeats)
    result = result.to_dict()
    print(json.dumps({"before": before, "peak": peak_rss_mib(), "chunk": chunk, "seconds": seconds,
                      "estimate_mib": chunk * per_sample / 2**20, "shape": shape,
                      **{key: result[key] for key in COMPARED}}))


def difference(run: dict, whole: dict) -> str:
    if all(run[key] == whole[key] for key in COMPARED):
        return "yes"
    return "no: " + ", ".join(key for key in COMPARED if run[key] != whole[key])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budgets", nargs="+", default=["256MB", "128MB", "64MB"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--glibc-default", action="store_true", help="default allocator in the children")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "T", "N", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, T, n, batch = args.child
        return child(name, int(T), int(n), int(batch), args.budget, args.repeats)
    runs = {budget: in_fresh_process(__file__, args.model, args.T, args.n, args.batch, "--budget", budget,
                                     "--repeats", args.repeats, "--threads", torch.get_num_threads(),
                                     exact_malloc=not args.glibc_default)
            for budget in ["none", *args.budgets]}
    whole = runs["none"]
    print(f"{args.model} at {'x'.join(map(str, whole['shape']))}, n = {args.n}, T = {args.T}, one batch of "
          f"{args.batch}, {torch.get_num_threads()} threads, median of {args.repeats} after a warm-up; MiB; "
          f"{'glibc default allocator' if args.glibc_default else 'tensors of 64 KiB or more freed to the system'}")
    print("| memory_budget | chunk | estimate | RSS before | peak | peak - before | evaluate s | same results |")
    print("|---|---|---|---|---|---|---|---|")
    for budget, run in runs.items():
        print(f"| {'none (whole batch)' if budget == 'none' else budget} | {run['chunk']} | "
              f"{run['estimate_mib']:.0f} | {run['before']:.0f} | {run['peak']:.0f} | "
              f"{run['peak'] - run['before']:.0f} | {run['seconds']:.2f} | {difference(run, whole)} |")


if __name__ == "__main__":
    main()
