"""The "opt-emp" threshold: minimize the quantization-plus-clipping error of eq. 24 over the
calibration data's own histogram instead of a fitted Gaussian (Section 5.5: the Gaussian
assumption is too strong for some layers).

The observer keeps a log2-spaced histogram of the site's output activation (``relu(x)`` or ``|x|``;
the quantizer is odd, so |x| suffices for y = x). Each bin is represented by ``POINTS`` evenly
spaced values, and the error ``sum_bins count * mean (f(x) - x)^2`` with
``f(x) = h * clip(floor(x / h + 1/2), 0, b)``, ``h = lam / T``, ``b = T * levels``, is minimized over
lam by a log grid between ``max / levels / 2**8`` and ``max / levels`` (above it nothing is
clipped and the rounding error mostly grows with lam; data of a few discrete values, whose best
step may put every value on a level, can have a lower error above it that the grid does not
search), then golden-section refinement around the best grid point.
"""
from __future__ import annotations

import math

import torch

POINTS = 8  # values per histogram bin
GRID = 48  # log-spaced candidates over 8 octaves
REFINE = 24  # golden-section steps (bracket shrinks by 0.618 each)
CHANNEL_BLOCK = 64  # channels evaluated together (bounds memory to ~block * GRID * points)


def _errors(lam, x, w, T, top):
    """Weighted error for candidates ``lam [C, G]`` over values ``x [P]`` with weights ``w [C, P]``."""
    h = (lam / T).unsqueeze(-1)  # [C, G, 1]
    f = h * torch.clamp(torch.floor(x / h + 0.5), 0, top)
    return ((f - x) ** 2 * w.unsqueeze(1)).sum(-1)  # [C, G]


def _points(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram as values ``x [P]`` (``POINTS`` per used bin) and their weights ``[C, P]``."""
    counts = counts.to(torch.float64)
    used = counts.sum(0) > 0
    frac = (torch.arange(POINTS, dtype=torch.float64) + 0.5) / POINTS
    x = (lo[used, None] + frac * (hi[used] - lo[used])[:, None]).flatten()
    return x, (counts[:, used] / POINTS).repeat_interleave(POINTS, dim=1)


def empirical_error(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lam: torch.Tensor, levels: int,
                    T: int) -> torch.Tensor:
    """The mean error of eq. 24 over the histogram at thresholds ``lam [C]`` (what "opt-emp"
    minimizes), per channel: how far a threshold is from the best the calibration data allows."""
    x, weights = _points(counts, lo, hi)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1)
    return _errors(lam, x, weights, T, T * levels).squeeze(1) / weights.sum(1)


def empirical_lam(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, vmax: torch.Tensor,
                  levels: int, T: int) -> torch.Tensor:
    """lam minimizing the histogram error; ``counts [C, bins]``, bin edges ``lo, hi [bins]``,
    ``vmax [C]`` (largest value seen). Channels that never saw a positive value get NaN."""
    x, weights = _points(counts, lo, hi)  # [P], [C, P]
    top = T * levels
    result = torch.full((counts.shape[0],), math.nan, dtype=torch.float64)
    upper = (vmax.to(torch.float64) / levels).log()
    for start in range(0, counts.shape[0], CHANNEL_BLOCK):
        block = slice(start, start + CHANNEL_BLOCK)
        hi_u = upper[block]
        grid = hi_u[:, None] + torch.linspace(-8 * math.log(2), 0, GRID, dtype=torch.float64)  # [C, G]
        err = _errors(grid.exp(), x, weights[block], T, top)
        best = err.argmin(1, keepdim=True)
        a = grid.gather(1, (best - 1).clamp(0, GRID - 1)).squeeze(1)
        b = grid.gather(1, (best + 1).clamp(0, GRID - 1)).squeeze(1)
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(REFINE):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            ec, ed = _errors(torch.stack((c, d), 1).exp(), x, weights[block], T, top).unbind(1)
            b = torch.where(ec < ed, d, b)
            a = torch.where(ec < ed, a, c)
        lam = ((a + b) / 2).exp()
        # keep the grid's best if refinement (on a possibly bumpy error) ended worse
        grid_best = grid.gather(1, best).squeeze(1).exp()
        e_lam, e_grid = _errors(torch.stack((lam, grid_best), 1), x, weights[block], T, top).unbind(1)
        chosen = torch.where(e_lam <= e_grid, lam, grid_best)
        result[block] = torch.where(torch.isfinite(hi_u) & (vmax[block] > 0), chosen, math.nan)
    return result
