"""Brackets of the global minimum of the expected error (eqs. 9/23) for inputs narrow against the levels.

For ``|mu| >> sigma`` against levels more than ~sigma apart, E(lam) has a local minimum (a valley,
about sigma / |mu| wide in log lam) wherever the mean sits on a level, and k = 1 of eq. 29 a root in
each: Lemma 4.7's single root holds for inputs wide against the levels only. ``coarse_brackets``
scans log lam over every lam that puts the mean on a level, in at most POINTS steps; where those
are coarser than the valleys (|mu| > ~130 sigma), or |mu| >= VALLEY_SCAN sigma, ``valley_brackets``
adds a scan at PER_VALLEY points per valley width over the window that holds the global minimum
(each valley that may hold it is then solved, and the least error kept):

- a top level ``b h`` (``h = lam / T``) below ``|mu| - BELOW sigma`` clips the input: the error
  exceeds ``E[(x - b h)^2; x > b h] > 4 sigma^2``, more than any level on the mean costs (< sigma^2);
- with the top level over ``|mu| + CLIP_REACH sigma`` clipping costs < 1e-16 relative, and the
  error of a level at offset d from the mean grows with the step h and with |d|: nothing there beats
  the first h that puts a level exactly on the mean, ``h = |mu| / L`` with
  ``L = floor(b |mu| / (|mu| + CLIP_REACH sigma))``;
- for steps of FLAT sigma or more every level on the mean costs sigma^2 (1 - O(phi(FLAT / 2))),
  the same to double precision: the window ends at ``|mu| + CLIP_REACH sigma``.
"""
from __future__ import annotations

import torch

from .error import quantization_error

COARSE = 0.25  # levels this many sigma apart at the first guess: k = 1 may have several roots
POINTS = 4096  # the most points of the coarse grid
GRID_BUDGET = 1 << 17  # grid points evaluated at once (memory ~ GRID_BUDGET x 100 terms x 8 bytes per temporary)
PER_VALLEY = 3  # fine-scan points per valley width sigma / |mu| (in log lam)
BELOW = 2.0  # sigmas the top level may sit below the mean (see the module docstring)
CLIP_REACH = 8.0  # sigmas beyond the mean where the top level no longer clips
FLAT = 20.0  # steps this many sigma wide: every level on the mean costs sigma^2
# |mu| / sigma from which the valleys are scanned even where the coarse grid resolves them: its
# least point can lie in a valley worse by up to ~sigma^2 / 36 (108 sigma, n = 3, T = 2: 0.99999999
# sigma^2, where 0.99985 is available). Below, the coarse grid's least alone, as before (there the
# scan would lower 44 of 128,000 typical thresholds' error by up to 1.5 %, but move them).
VALLEY_SCAN = 100.0


def _grid_errors(start, step, stop, mu, sigma, T, b, signed):
    """Per chunk of inputs ``(part, u, error)``: the error on ``u = start + step * j`` (``inf`` past
    ``stop``), in chunks of about GRID_BUDGET grid points: each point's error sums up to ~100 terms,
    and a model's narrow channels solved in one call took gigabytes (2,048 channels, n = 5,
    mu = 10 sigma: 1.6 GB); every input has its own grid, so the chunks do not change any result."""
    counts = ((stop - start) / step).ceil() + 1
    per_chunk = max(1, GRID_BUDGET // int(counts.max().item()))
    for part in torch.arange(mu.numel(), device=mu.device).split(per_chunk):
        count = int(counts[part].max().item())
        u = start[part, None] + step[part, None] * torch.arange(count, dtype=torch.float64, device=mu.device)
        error = quantization_error(torch.exp(u), mu[part, None], sigma[part, None], None, T[part, None], signed,
                                   levels=(b[part] / T[part])[:, None])
        yield part, u, torch.where(u <= stop[part, None], error, torch.inf)


def coarse_brackets(guess, mu, sigma, T, b, signed):
    """``(lo, hi, scan)``: ``guess -+ 0.7``, or where the levels at ``guess`` are more than COARSE
    sigma apart the neighbours of the least error on a log lam grid spanning every lam that puts the
    mean on a level, and beyond, in steps of a third of a valley's width or, at most, POINTS points;
    ``scan`` indexes the inputs whose valleys ``valley_brackets`` must scan: where that grid is
    coarser than a valley, or |mu| is VALLEY_SCAN sigma or more."""
    lo, hi = guess - 0.7, guess + 0.7
    narrow = torch.nonzero(torch.exp(guess) / T > COARSE * sigma).flatten()
    if narrow.numel() == 0:
        return lo, hi, narrow
    m, s = mu[narrow].abs(), sigma[narrow]
    start = guess[narrow] - 1.0  # the top level 3 sigma beyond the mean, and below
    stop = guess[narrow] + torch.log(b[narrow]) + 1.0  # the first level there, and beyond
    # each input's own span bounds its step (not the widest span in the batch: a site's lam must
    # not depend on the other sites solved in the same call)
    fine = s / (PER_VALLEY * m.clamp(min=s))
    step = torch.minimum(fine, torch.full_like(m, 0.125)).maximum((stop - start) / (POINTS - 1))
    for part, u, error in _grid_errors(start, step, stop, mu[narrow], s, T[narrow], b[narrow], signed):
        best = error.argmin(1)
        inside = (best > 0) & (best < u.shape[1] - 1)
        where = narrow[part[inside]]
        lo[where] = u[inside].gather(1, (best[inside] - 1)[:, None]).squeeze(1)
        hi[where] = u[inside].gather(1, (best[inside] + 1)[:, None]).squeeze(1)
    return lo, hi, narrow[(step > fine) | (m >= VALLEY_SCAN * s)]


def valley_brackets(inputs, mu, sigma, T, b, signed):
    """``(owner, lo, hi)``: for each of ``inputs``, brackets of the valleys in the window of the module
    docstring whose least point on a grid of PER_VALLEY points per valley width is within
    ``(|mu| step)^2`` of the least of all: a level is at most half a step off the mean at a valley's
    nearest point, and the error grows like that offset squared, so that is four times the most the
    point exceeds the valley's bottom, and the global minimum's valley is among them. ``owner``
    holds the input of each bracket."""
    m, s, t, levels = mu[inputs].abs(), sigma[inputs], T[inputs], b[inputs]
    step = s / (PER_VALLEY * m)
    reach = m + CLIP_REACH * s
    top = torch.where(m / levels < FLAT * s, levels * m / torch.floor(levels * m / reach), reach)
    start = torch.log(t * (m - BELOW * s) / levels)
    stop = torch.log(t * top / levels) + 2 * step  # the last valley's far side
    owner, lo, hi = [], [], []
    for part, u, error in _grid_errors(start, step, stop, mu[inputs], s, t, levels, signed):
        mid = error[:, 1:-1]
        slack = (m[part, None] * step[part, None]) ** 2
        row, col = torch.nonzero((mid < error[:, :-2]) & (mid <= error[:, 2:]) & (mid <= error.amin(1, True) + slack),
                                 as_tuple=True)
        owner.append(inputs[part[row]])
        lo.append(u[row, col])
        hi.append(u[row, col + 2])
    return torch.cat(owner), torch.cat(lo), torch.cat(hi)
