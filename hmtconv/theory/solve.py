"""Threshold selection: the converged optimum (root of k = 1, Lemma 4.7) and Algorithm 1 as published."""
from __future__ import annotations

import torch

from .error import _check, broadcast64, is_point_mass, levels_for, moments, quantization_error
from .fine_grid import fine_log_k, is_fine
from .valleys import coarse_brackets, valley_brackets

_GTOL = 1e-14
DEAD_UNIT_LAM = 1.0
# A ReLU input more than DEEP_TAIL sigmas below zero fires with probability < 1e-2000. Its positive
# part tends to an exponential of rate |mu| / sigma^2, so the optimum tends to lam ~ sigma^2 / |mu|
# (relative correction O((sigma / mu)^2), here < 1e-4); beyond this depth the sums lose precision.
DEEP_TAIL = 100.0  # documented choice where every lam is optimal (the neuron never fires)


def _log_k(u, mu, sigma, T, b, signed):
    """log k(lam = e^u) of eq. 29 (k > 1 below the optimum, < 1 above it); on grids much finer than
    sigma from the expected error's slope and divided by (h / sigma)^2 (fine_grid.py: there the
    sums' ratio is 1 + rounding, and log k itself below the solver's tolerance _GTOL)."""
    h = torch.exp(u) / T
    fine = is_fine(h / sigma, mu / sigma)
    if fine.any():
        out = torch.empty_like(h)
        out[fine] = fine_log_k(mu[fine], sigma[fine], h[fine], b[fine], signed)
        out[~fine] = _log_k_sums(mu[~fine], sigma[~fine], h[~fine], b[~fine], signed)
        return out
    return _log_k_sums(mu, sigma, h, b, signed)


def _log_k_sums(mu, sigma, h, b, signed):
    s_xf, s_ff, _ = moments(mu, sigma, h, b, signed)
    return torch.log(s_xf) - torch.log(h * s_ff)


def _point_mass_lam(mu, b, T, signed):
    """sigma = 0: the lam whose top level equals |mu|, so every step outputs mu exactly (eq. 20).

    Where mu is not representable at all (ReLU with mu <= 0, or mu = 0) any lam is optimal and
    DEAD_UNIT_LAM is returned.
    """
    value = mu.abs() if signed else mu
    return torch.where(value > 0, value * T / b, torch.full_like(mu, DEAD_UNIT_LAM))


def optimal_lam(mu, sigma, n, T, signed: bool, levels=None, rtol: float = 1e-12, max_iter: int = 400):
    """The lam (lambda_min) minimizing the expected error of eqs. 9/23: a root of k = 1 (the
    unique one of Lemma 4.7 for wide inputs; among several for narrow ones, the global minimum's
    from |mu| = VALLEY_SCAN sigma on, below it the least point of a coarse grid's valley, whose
    error may exceed the global minimum's by about 1.5 %: valleys.py).

    Bracketed in log lam (for narrow inputs, around the least errors of grids: valleys.py; each
    candidate valley solved, the least error kept), then refined by the Anderson-Bjorck variant of
    regula falsi on log k, which converges superlinearly and never leaves the bracket. Returns
    float64 with the broadcast shape.
    ``sigma = 0`` is solved exactly (see ``_point_mass_lam``).
    """
    if not (isinstance(rtol, (int, float)) and rtol > 0) or isinstance(max_iter, bool) or not (
            isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"optimal_lam needs rtol > 0 and max_iter >= 1, got rtol={rtol!r}, max_iter={max_iter!r}")
    mu, sigma, T = broadcast64(mu, sigma, T)
    _check(sigma=sigma, T=T, mu=mu)
    b = T * levels_for(n, levels)
    mu, sigma, T, b = broadcast64(mu, sigma, T, b)
    shape = mu.shape
    mu, sigma, T, b = (t.reshape(-1) for t in (mu, sigma, T, b))
    lam = _point_mass_lam(mu, b, T, signed)
    live = ~is_point_mass(mu, sigma)
    depth = torch.ones_like(mu)
    if not signed:
        depth = torch.where(live & (mu < -DEEP_TAIL * sigma), -mu / (DEEP_TAIL * sigma), depth)
    if live.any():
        mu_solved = mu[live] / depth[live]
        lam[live] = _solve(mu_solved, sigma[live], T[live], b[live], signed, rtol, max_iter) / depth[live]
    return lam.reshape(shape)


STALL = 3  # regula falsi steps without halving the bracket before a bisection


def _solve(mu, sigma, T, b, signed, rtol, max_iter):
    # around the lam whose top level sits 3 sigma beyond the mean, the global minimum's bracket
    guess = torch.log((mu.abs() + 3 * sigma) * T / b)
    lo, hi, scan = coarse_brackets(guess, mu, sigma, T, b, signed)
    owner = torch.arange(mu.numel(), device=mu.device)
    if scan.numel() == 0:
        return _roots(lo, hi, owner, mu, sigma, T, b, signed, rtol, max_iter)
    # valleys that may hold the global minimum: each one's root, then the least error
    extra, v_lo, v_hi = valley_brackets(scan, mu, sigma, T, b, signed)
    owner = torch.cat((owner, extra))
    lam = _roots(torch.cat((lo, v_lo)), torch.cat((hi, v_hi)), owner, mu, sigma, T, b, signed, rtol, max_iter)
    contested = torch.cat((scan, mu.numel() + torch.arange(extra.numel(), device=mu.device)))
    return lam[_least_error(lam, owner, contested, mu, sigma, T, b, signed)]


def _least_error(lam, owner, rows, mu, sigma, T, b, signed):
    """Per input, the row of least expected error (eqs. 9/23) among ``rows`` of its candidates
    ``lam`` (``owner`` their inputs), the first on a tie; its own row where it has no other."""
    who = owner[rows]
    error = quantization_error(lam[rows], mu[who], sigma[who], None, T[who], signed, levels=(b / T)[who])
    least = torch.full_like(mu, torch.inf).scatter_reduce(0, who, error, "amin")
    none = lam.numel()
    winner = torch.where(error <= least[who], rows, none)  # (a NaN error never wins)
    first = torch.full_like(owner[:mu.numel()], none).scatter_reduce(0, who, winner, "amin")
    return torch.where(first < none, first, torch.arange(mu.numel(), device=mu.device))


def _roots(lo, hi, owner, mu, sigma, T, b, signed, rtol, max_iter):
    """The root of k = 1 (eq. 29) from each bracket ``[lo, hi]`` of log lam (``owner`` its input),
    widened by 4x until k = 1 is bracketed."""
    def log_k(u, idx):
        who = owner[idx]
        return _log_k(u, mu[who], sigma[who], T[who], b[who], signed)

    every = torch.arange(lo.numel(), device=lo.device)
    g_lo, g_hi = log_k(lo, every), log_k(hi, every)
    for _ in range(200):
        need_lo, need_hi = g_lo <= 0, g_hi >= 0
        if not (need_lo.any() or need_hi.any()):
            break
        lo = torch.where(need_lo, lo - 1.4, lo)
        hi = torch.where(need_hi, hi + 1.4, hi)
        g_lo[need_lo] = log_k(lo[need_lo], every[need_lo])
        g_hi[need_hi] = log_k(hi[need_hi], every[need_hi])
    else:
        raise RuntimeError("optimal_lam: could not bracket the root of k = 1")
    # Anderson-Bjorck regula falsi on log k: superlinear, never leaves the bracket. |log k| <= GTOL
    # pins log lam to about GTOL / |d log k / d log lam|, far below rtol (the slope is O(1)).
    # Where log k is nearly flat on one side of the root (a narrow input, |mu| >> sigma: log k ~ -5e-9
    # over a factor 2 of lam above it) regula falsi creeps; a bisection whenever the bracket has not
    # halved in STALL steps bounds the steps to about STALL + 1 times bisection's.
    tol = abs(torch.log1p(torch.tensor(rtol, dtype=torch.float64)).item())
    best = torch.where(g_lo.abs() < g_hi.abs(), lo, hi)
    # log k at best: the stopping test reads it, never an endpoint's value that Anderson-Bjorck scaled
    # (on a plateau of log k, e.g. -1/60 beyond a fine grid's optimum, a scale 1 - g/g_old ~ 1e-16
    # made it look like a root: n = 16, T = 4096, mu = 2 sigma stopped at 1.5x the optimal lam)
    g_best = torch.minimum(g_lo.abs(), g_hi.abs())
    kept = torch.zeros_like(lo)  # +1 if lo moved last time (hi kept), -1 if hi moved
    mark, since = hi - lo, torch.zeros_like(lo)  # bracket width at the last halving, steps since
    for _ in range(max_iter):
        act = torch.nonzero((hi - lo > tol) & (g_best > _GTOL)).flatten()
        if act.numel() == 0:
            break
        l, h, gl, gh, last = lo[act], hi[act], g_lo[act], g_hi[act], kept[act]
        u = (l * gh - h * gl) / (gh - gl)
        ok = torch.isfinite(u) & (u > l) & (u < h) & (since[act] < STALL)
        u = torch.where(ok, u, (l + h) / 2)
        g = log_k(u, act)
        right = g >= 0  # k >= 1: the root lies at or above u
        # Anderson-Bjorck: scale the value of the endpoint kept twice in a row
        scale_hi = torch.where(right & (last > 0), _ab_factor(g, gl), torch.ones_like(g))
        scale_lo = torch.where(~right & (last < 0), _ab_factor(g, gh), torch.ones_like(g))
        lo[act] = torch.where(right, u, l)
        g_lo[act] = torch.where(right, g, gl * scale_lo)
        hi[act] = torch.where(right, h, u)
        g_hi[act] = torch.where(right, gh * scale_hi, g)
        kept[act] = right.to(kept.dtype) * 2 - 1
        best[act] = u
        g_best[act] = g.abs()
        halved = hi[act] - lo[act] <= mark[act] / 2
        mark[act] = torch.where(halved, hi[act] - lo[act], mark[act])
        since[act] = torch.where(halved, 0.0, since[act] + 1)
    return torch.exp(best)


def _ab_factor(g_new, g_old):
    """Anderson-Bjorck weight 1 - g_new/g_old, or 1/2 (Illinois) when that is not positive."""
    m = 1 - g_new / g_old
    return torch.where(m > 0, m, torch.full_like(m, 0.5))


def fixed_point_lam(mu, sigma, n, T, signed: bool, steps: int = 1500, theta0: float = 1.0, levels=None):
    """Algorithm 1 as the published code runs it: ``theta <- k(theta) * theta``, ``steps`` times from
    ``theta0``, no stopping rule. Slow to converge: compare with ``optimal_lam``.

    ``sigma = 0`` (where k is undefined) returns the exact point-mass lam of ``optimal_lam``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fixed_point_lam needs steps >= 0, got {steps!r}")
    mu, sigma, T = broadcast64(mu, sigma, T)
    _check(sigma=sigma, T=T, mu=mu)
    b = T * levels_for(n, levels)
    mu, sigma, T, b = broadcast64(mu, sigma, T, b)
    live = ~is_point_mass(mu, sigma)
    theta = torch.full_like(mu, float(theta0))
    safe_sigma = torch.where(live, sigma, torch.ones_like(sigma))
    for _ in range(steps):
        h = theta / T
        s_xf, s_ff, _ = moments(mu, safe_sigma, h, b, signed)
        theta = T * s_xf / s_ff  # k * theta, since k = s_xf / (h s_ff) and theta = T h
    return torch.where(live, theta, _point_mass_lam(mu, b, T, signed))
