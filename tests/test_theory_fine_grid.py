"""optimal_lam on grids much finer than sigma (fine_grid.py), against the expected error minimized
directly: granular h^2/12 on the levels' range plus the exact overload beyond the top level (the
granular part's next term is ~(h/sigma)^2 relative, below 1e-8 here)."""
import math

import pytest
import torch

from hmtconv.theory import optimal_lam


def _upper_tail(c: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.special.erfc(c / math.sqrt(2))


def _model_error(h, mu, b, signed):
    """E[(f - target)^2] for sigma = 1 and h << 1: h^2 / 12 inside [-c', c'] (or [0, c']) and the
    clipped tails' E[(x - b h)^2; x > c'] exactly, c' = (b - 1/2) h."""
    edge, top = (b - 0.5) * h, b * h
    total = torch.zeros_like(h)
    for m in ((mu, -mu) if signed else (mu,)):
        t = edge - m
        pdf, tail = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi), _upper_tail(t)
        # E[(x - top)^2; x > edge] with x - top = (x - edge) - h/2
        total += (1 + t * t) * tail - t * pdf - (top - edge) * 2 * (pdf - t * tail) + (top - edge) ** 2 * tail
        total += h * h / 12 * (_upper_tail(-m) - tail)  # the levels' range [0, c'] of this side
    return total


@pytest.mark.parametrize("signed", [False, True])
def test_optimal_lam_on_grids_much_finer_than_sigma(signed):
    """Was: k - 1 ~ (h/sigma)^2 lost in rounding: at n = 16, T = 4096 (2.7e8 levels) lam came out
    1.5-20x the optimum (top level at 12-166 sigma instead of ~8-10)."""
    mu = torch.tensor([0.0, 0.3, 2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    n = torch.tensor([16, 16, 16, 16, 12, 14])
    T = torch.tensor([4096, 4096, 4096, 256, 16, 64])
    b = (T * (2**n - 1)).double()
    lam = optimal_lam(mu, 1.0, n, T, signed)
    # the minimum of the model error by ternary search in log h, from far below to far above
    lo, hi = torch.log(2 / b), torch.log(40 / b)
    for _ in range(200):
        a, c = (2 * lo + hi) / 3, (lo + 2 * hi) / 3
        left = _model_error(torch.exp(a), mu, b, signed) < _model_error(torch.exp(c), mu, b, signed)
        lo, hi = torch.where(left, lo, a), torch.where(left, c, hi)
    torch.testing.assert_close(lam, torch.exp((lo + hi) / 2) * T.double(), rtol=1e-6, atol=0)
