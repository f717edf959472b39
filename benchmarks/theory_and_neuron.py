"""Foundation benchmark: threshold solver and closed-form neuron, each against its slow baseline.

    .venv/bin/python benchmarks/theory_and_neuron.py [--pairs 8000] [--subsample 64]

(a) optimal_lam for N (mu, sigma) pairs against the published 1,500-step fixed point (timed on a
    subsample and extrapolated), with the fixed point's distance from the optimum.
(b) HMTNeuron (closed form) against the literal greedy loop over the n thresholds (eqs. 14-18),
    n = 8, T = 16, input [16, 32, 64, 32, 32].
Median of repeats after a warm-up; ratios are measured side by side in one process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import hmt_literal  # noqa: E402

import hmtconv.theory.solve as solve  # noqa: E402
from hmtconv import HMTNeuron  # noqa: E402
from hmtconv.theory import fixed_point_lam, optimal_lam, quantization_error  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def count_k_evaluations(fn):
    """Run fn once, counting evaluations of eq. 29 (per pair, on average)."""
    original, seen = solve._log_k, []

    def counting(u, *args):
        seen.append(u.numel())
        return original(u, *args)

    solve._log_k = counting
    try:
        fn()
    finally:
        solve._log_k = original
    return len(seen), sum(seen)


def bench_solver(pairs, subsample, repeats):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(pairs, generator=g, dtype=torch.float64) * 0.5
    sigma = torch.rand(pairs, generator=g, dtype=torch.float64) + 0.05
    print(f"(a) threshold solve, {pairs} (mu, sigma) pairs; fixed point timed on {subsample} and extrapolated")
    print("| n | T | signed | optimal_lam s | k evals (rounds, per pair) | 1500-step s (extrap.) | speed-up |"
          " lam_1500/lam_opt median [min, max] | QE_1500/QE_opt median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, T, signed in ((4, 4, False), (4, 16, True), (8, 16, True)):
        t_opt, lam = timed(lambda: optimal_lam(mu, sigma, n, T, signed), repeats)
        rounds, evals = count_k_evaluations(lambda: optimal_lam(mu, sigma, n, T, signed))
        sub = slice(0, subsample)
        t_fp, lam_fp = timed(lambda: fixed_point_lam(mu[sub], sigma[sub], n, T, signed), 1)
        t_fp_all = t_fp * pairs / subsample
        ratio = lam_fp / lam[sub]
        qe_ratio = (quantization_error(lam_fp, mu[sub], sigma[sub], n, T, signed)
                    / quantization_error(lam[sub], mu[sub], sigma[sub], n, T, signed))
        print(f"| {n} | {T} | {'yes' if signed else 'no'} | {t_opt:.3f} | {rounds}, {evals / pairs:.1f} | "
              f"{t_fp_all:.1f} | {t_fp_all / t_opt:.0f}x | {ratio.median():.3f} [{ratio.min():.3f}, "
              f"{ratio.max():.3f}] | {qe_ratio.median():.3f} |")


def bench_neuron(repeats):
    n, shape = 8, (16, 32, 64, 32, 32)
    g = torch.Generator().manual_seed(0)
    lam = 0.01
    x = torch.randn(shape, generator=g) * 0.5
    neuron = HMTNeuron(n, lam)
    t_fast, out = timed(lambda: neuron(x), repeats)
    t_loop, (ref, _) = timed(lambda: hmt_literal(x, lam, n), max(1, repeats // 2))
    floor_bound = lambda: (torch.floor(x / lam).clamp_(0, 2**n - 1) * lam)  # noqa: E731
    t_floor, _ = timed(floor_bound, repeats)
    assert torch.equal(out, ref)
    print(f"\n(b) neuron n = {n}, input {list(shape)} float32, {torch.get_num_threads()} threads")
    print("| implementation | time s | relative to closed form |")
    print("|---|---|---|")
    print(f"| closed form (HMTNeuron) | {t_fast:.3f} | 1.00 |")
    print(f"| literal greedy loop over thresholds | {t_loop:.3f} | {t_loop / t_fast:.2f} |")
    print(f"| elementwise floor/clamp, no state (lower bound) | {t_floor:.3f} | {t_floor / t_fast:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8000)
    parser.add_argument("--subsample", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_solver(args.pairs, args.subsample, args.repeats)
    bench_neuron(args.repeats)


if __name__ == "__main__":
    main()
