"""Threshold solve: optimal_lam against the published 1,500-step fixed point (Algorithm 1).

    .venv/bin/python benchmarks/theory.py [--pairs 8000] [--subsample 64]

For N (mu, sigma) pairs (about a ResNet34's channels): time and eq.-29 evaluations of
optimal_lam, the fixed point's time (30 of its 1,500 steps, extrapolated), and how far the fixed point
stops from the optimum (lam ratio and excess expected error). Median of repeats after a warm-up.
"""
from __future__ import annotations

import argparse

import torch

import hmtconv.theory.solve as solve
from timing import timed_side_by_side
from hmtconv.theory import fixed_point_lam, optimal_lam, quantization_error


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
    print(f"(a) threshold solve, {pairs} (mu, sigma) pairs; the 1,500-step fixed point timed for 30 steps "
          f"on all pairs (x 50), its distance from the optimum on the first {subsample}")
    print("| n | T | signed | optimal_lam s | k evals (rounds, per pair) | 1500-step s (extrap.) | speed-up |"
          " lam_1500/lam_opt median [min, max] | QE_1500/QE_opt median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, T, signed in ((4, 4, False), (4, 16, True), (8, 16, True)):
        # time, side by side: 30 of the 1,500 steps on every pair (each step costs the same), times 50;
        # distance from the optimum: all 1,500 steps on a subsample
        (t_opt, t_fp), (lam, _) = timed_side_by_side([lambda: optimal_lam(mu, sigma, n, T, signed),
                                                      lambda: fixed_point_lam(mu, sigma, n, T, signed, steps=30)],
                                                     repeats)
        rounds, evals = count_k_evaluations(lambda: optimal_lam(mu, sigma, n, T, signed))
        t_fp_all = t_fp * 1500 / 30
        sub = slice(0, subsample)
        lam_fp = fixed_point_lam(mu[sub], sigma[sub], n, T, signed)
        ratio = lam_fp / lam[sub]
        qe_ratio = (quantization_error(lam_fp, mu[sub], sigma[sub], n, T, signed)
                    / quantization_error(lam[sub], mu[sub], sigma[sub], n, T, signed))
        print(f"| {n} | {T} | {'yes' if signed else 'no'} | {t_opt:.3f} | {rounds}, {evals / pairs:.1f} | "
              f"{t_fp_all:.1f} | {t_fp_all / t_opt:.0f}x | {ratio.median():.3f} [{ratio.min():.3f}, "
              f"{ratio.max():.3f}] | {qe_ratio.median():.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8000)
    parser.add_argument("--subsample", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_solver(args.pairs, args.subsample, args.repeats)


if __name__ == "__main__":
    main()
