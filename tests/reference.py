"""Independent, literal implementations used as test oracles (slow on purpose: loops, not formulas)."""
from __future__ import annotations

import math

import numpy as np
import torch


def basal_fire(v, current, lam, n):
    """Eqs. 14-18 literally: greedy largest-first thresholds within one step.

    Returns (output x[t], membrane v[t], spike count). Eq. 17 factored as lam * sum(s_i 2**(n-i))
    so that the output is the exactly rounded product; v[t] = m_1 - x[t] (eq. 18).
    """
    m1 = v + current
    m = m1
    level = torch.zeros_like(m)
    spikes = torch.zeros_like(m)
    for i in range(1, n + 1):
        threshold = lam * 2.0 ** (n - i)  # eq. 12
        s = (m >= threshold).to(m.dtype)  # eq. 15
        m = m - threshold * s  # eq. 16
        level = level + s * 2.0 ** (n - i)
        spikes = spikes + s
    x = level * lam  # eq. 17
    return x, m1 - x, spikes


def hmt_literal(x, lam, n, signed=False, communicate=True):
    """Sequential H-MT over time (eqs. 13-18, 21); x is [T, *shape]. Returns (out, spikes per step)."""
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    v_pos = (lam / 2).expand(x.shape[1:]).clone()  # eq. 13
    v_neg = v_pos.clone()
    outs, counts = [], []
    for t in range(x.shape[0]):
        out_pos, v_pos, s_pos = basal_fire(v_pos, x[t], lam, n)
        if signed:
            out_neg, v_neg, s_neg = basal_fire(v_neg, -x[t], lam, n)
            if communicate:  # eq. 21
                v_pos, v_neg = v_pos + out_neg, v_neg + out_pos
            outs.append(out_pos - out_neg)
            counts.append((s_pos + s_neg).sum())
        else:
            outs.append(out_pos)
            counts.append(s_pos.sum())
    return torch.stack(outs), torch.stack(counts).to(torch.float64)


def hmt_literal_membranes(x, lam, n, communicate=True):
    """Signed H-MT membranes (v_P, v_N) after every step, for Lemma 4.1."""
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    v_pos = (lam / 2).expand(x.shape[1:]).clone()
    v_neg = v_pos.clone()
    trace = []
    for t in range(x.shape[0]):
        out_pos, v_pos, s_pos = basal_fire(v_pos, x[t], lam, n)
        out_neg, v_neg, s_neg = basal_fire(v_neg, -x[t], lam, n)
        if communicate:
            v_pos, v_neg = v_pos + out_neg, v_neg + out_pos
        trace.append((v_pos.clone(), v_neg.clone(), s_pos, s_neg))
    return trace


def f_quantizer(x, lam, n, T, signed, levels=None):
    """Eq. 24 with N = T, theta = lam, b = T (2^n - 1), a = -b or 0 (numpy, elementwise)."""
    b = T * ((2**n - 1) if levels is None else levels)
    a = -b if signed else 0
    return lam / T * np.clip(np.floor((T * x + lam / 2) / lam), a, b)


def qe_numeric(lam, mu, sigma, n, T, signed, levels=None, nodes=24, span=12.0):
    """E[(f(x) - target(x))^2] by Gauss-Legendre quadrature on each constant piece of f."""
    h = lam / T
    lo, hi = mu - span * sigma, mu + span * sigma
    b = T * ((2**n - 1) if levels is None else levels)
    jumps = (np.arange(-b if signed else 1, b + 1) - 0.5) * h
    jumps = jumps[(jumps > lo) & (jumps < hi)]
    if not signed:
        jumps = np.concatenate([jumps, [0.0]]) if lo < 0 < hi else jumps
    edges = np.unique(np.concatenate([[lo, hi], jumps]))
    # split long pieces so each is at most sigma/2 wide
    pieces = []
    for a_, b_ in zip(edges[:-1], edges[1:]):
        k = max(1, int(math.ceil((b_ - a_) / (sigma / 2))))
        pieces.extend(zip(np.linspace(a_, b_, k + 1)[:-1], np.linspace(a_, b_, k + 1)[1:]))
    t, w = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for a_, b_ in pieces:
        xs = (b_ - a_) / 2 * t + (a_ + b_) / 2
        target = xs if signed else np.maximum(xs, 0)
        dens = np.exp(-((xs - mu) / sigma) ** 2 / 2) / (sigma * math.sqrt(2 * math.pi))
        total += (b_ - a_) / 2 * np.sum(w * (f_quantizer(xs, lam, n, T, signed, levels) - target) ** 2 * dens)
    return total


def k_eq29(theta, mu, sigma, n_steps, a, b):
    """Eq. 29 exactly as printed (n there is N = T), summed term by term."""
    i = np.arange(a + 1, b + 1, dtype=np.float64)
    arg = ((2 * i - 1) / (2 * n_steps) * theta - mu) / (math.sqrt(2) * sigma)
    erf = np.array([math.erf(v) for v in arg])
    gauss = np.exp(-arg**2)
    den = a * a + b * b - np.sum((2 * i - 1) * erf)
    first = mu / theta * n_steps * (a + b - np.sum(erf)) / den
    second = sigma / (math.sqrt(math.pi / 2) * theta) * n_steps * np.sum(gauss) / den
    return first + second


def optimal_lam(mu: float, sigma: float, n: int, T: int, signed: bool) -> float:
    """The root of eq. 29's k(theta) = 1 (a = -b for a signed site, else 0; b = T (2^n - 1)) by
    bisection on log k: Lemma 4.7, k > 1 below the optimum and < 1 above."""
    b = T * (2**n - 1)
    def log_k(theta):
        return math.log(k_eq29(theta, mu, sigma, T, -b if signed else 0, b))
    lo = hi = sigma + abs(mu)
    while log_k(lo) <= 0:
        lo /= 2
    while log_k(hi) >= 0:
        hi *= 2
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if log_k(mid) > 0 else (lo, mid)
    return math.sqrt(lo * hi)


def moments(seen: dict) -> dict[str, tuple[float, float]]:
    """Mean and population standard deviation of each site's inputs (``seen[name]``: a list)."""
    values = {name: torch.cat([x.flatten() for x in xs]) for name, xs in seen.items()}
    return {name: (v.mean().item(), v.std(correction=0).item()) for name, v in values.items()}
