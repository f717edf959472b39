"""log k of eq. 29 on grids much finer than sigma, where k is 1 to double precision.

With ``h = lam / T`` the step and ``delta = h / sigma``, ``k - 1 ~ delta^2``: from the sums of
``gaussian_sums`` it is a difference of nearly equal numbers, lost in rounding once delta < ~1e-5
(n = 16, T = 4096: the lam returned was 2-20x the optimum). Here it comes from the derivative of
the expected error E (eq. 23) itself: ``dE/dh = 2 E[(f - x) L] = (2 / h) E[f^2] (1 - k)``, so

    k - 1 = -h E'(h) / (2 E[f^2]),

and one side of E (see error.py) splits into the granular part on [0, c'], ``c' = (b - 1/2) h``,
where f - x is a sawtooth of period h, and the overload beyond it, ``int_{c'}^inf (b h - x)^2 p``:

    granular = h^2 [P / 12 - sum_m 2 h^2m / (2m+2)! [B~_{2m+2}(x / h + 1/2) p^(2m-1)(x)]_0^{c'}]

(integration by parts against the sawtooth's periodic Bernoulli antiderivatives; the odd ones
vanish at both ends, and the remainder is ~exp(-2 pi^2 / delta^2)). Every term is a product, none
a difference of near equals. ``E[f^2]`` is replaced by ``E[target^2]``: they differ by
O(delta^2) relative, which moves no root. Terms up to m = TERMS: the next is ~(delta z)^8 relative.
"""
from __future__ import annotations

import math

import torch

from .gaussian_sums import _hermite, _scaled_q_phi

FINE = 1e-3  # delta * (10 + |mu| / sigma) below this: the expansion is exact to double precision
TERMS = 3
_BERNOULLI = (-1 / 30, 1 / 42, -1 / 30)  # B_4, B_6, B_8


def is_fine(delta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Where ``fine_log_k`` applies: steps far below the density's scale at every end (z up to ~10 + |c|)."""
    return delta * (10 + c.abs()) < FINE


def _side(c, delta, b, z_ref):
    """``(dE/d delta, E[x^2; x > 0])`` of one side, sigma = 1, both times ``exp(z_ref^2 / 2)``."""
    top = b - 0.5
    t = top * delta - c
    z = torch.stack((t, -c))  # the top level's threshold, and 0
    q, phi, _ = _scaled_q_phi(z, z_ref)
    d = _hermite(z, 2 * TERMS) * phi.unsqueeze(-1)
    d = d * torch.tensor([(-1.0) ** k for k in range(2 * TERMS + 1)], dtype=d.dtype, device=d.device)  # p^(k)
    # granular: d/d delta of delta^2 P / 12 (P = Q(-c) - Q(t), dP/d delta = top p(t)); overload: the
    # top level's gap (delta/2)^2 at c' moving at rate top, and 2 b times the mean of (b delta - x) beyond
    slope = delta * (q[1] - q[0]) / 6 - delta**2 * top * phi[0] / 6 + 2 * b * (delta / 2 * q[0] - (phi[0] - t * q[0]))
    for m, bern in enumerate(_BERNOULLI, 1):
        at_top, at_zero = bern, -(1 - 2.0 ** -(2 * m + 1)) * bern  # B~(integer), B~(1/2)
        ends = at_top * d[0, :, 2 * m - 1] - at_zero * d[1, :, 2 * m - 1]
        slope = slope - 2 / math.factorial(2 * m + 2) * (
            (2 * m + 2) * delta ** (2 * m + 1) * ends + delta ** (2 * m + 2) * at_top * d[0, :, 2 * m] * top)
    return slope, (1 + c * c) * q[1] + c * phi[1]


def fine_log_k(mu, sigma, h, b, signed: bool) -> torch.Tensor:
    """``log k / delta^2`` (eq. 29) for 1-D float64 tensors where ``is_fine`` holds (sigma > 0): O(1),
    so that a root finder's tolerance on it means what it means on log k elsewhere."""
    delta = h / sigma
    slope, moment, logs = [], [], []
    for sign in ((1.0, -1.0) if signed else (1.0,)):
        c = sign * mu / sigma
        z_ref = (-c).clamp(min=0)  # 0 lies z_ref sigmas above the mean: scaled as gaussian_sums does
        side = _side(c, delta, b, z_ref)
        slope.append(side[0])
        moment.append(side[1])
        logs.append(-z_ref * z_ref / 2)
    weights = torch.exp(torch.stack(logs) - torch.stack(logs).amax(0))
    k_minus_1 = -delta * (weights * torch.stack(slope)).sum(0) / (2 * (weights * torch.stack(moment)).sum(0))
    return torch.log1p(k_minus_1) / (delta * delta)
