"""The three sums behind eqs. 23-29, exact for Gaussian inputs and fast at any grid size.

For one side of the quantizer f of eq. 24 (levels ``L = 1..b`` on thresholds
``x_i = (i - 1/2) h``, ``h = lam / T``, ``b = T * levels``) and ``x ~ N(mu, sigma^2)``,
with ``z_i = (x_i - mu) / sigma`` on a uniform grid of step ``delta = h / sigma``:

    A = sum_i Q(z_i) = E[L],   B = sum_i (2i - 1) Q(z_i) = E[L^2],   C = sum_i phi(z_i),

where ``Q = 1 - Phi`` and ``E[x L] = mu A + sigma C``. Every term of eq. 29 is one of these.

Evaluated term by term they cost up to ``b`` erf calls (8,160 per pair for n = 8, T = 16).
Instead: indices with ``z_i < -W`` have ``Q = 1, phi = 0`` to double precision (counted in
closed form); indices with ``z_i > W`` vanish; the window in between is summed directly when it
holds few terms (at most _MAX_DIRECT, always so on a coarse grid), and otherwise, on a fine grid
(``delta < 2 W / _MAX_DIRECT < DELTA_EM``), by the Euler-Maclaurin formula, where exact integrals
plus end corrections with Hermite derivatives reach machine precision. The integrals over a
window narrower than GL_WIDTH in z come from Gauss-Legendre nodes, not from a difference of
antiderivatives, which would cancel (at lam = 1e-9 sigma, n = T = 4, eq. 29's k was 59x too large).

Far tails (a ReLU input many sigmas below its first threshold) would underflow; every side is
therefore returned scaled by ``exp(-z_ref^2 / 2)`` with ``z_ref = max(z_1, 0)``: the sums are
``(A, B, C) * exp(log_scale)``. Ratios such as eq. 29 never leave the representable range.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

W = 10.0  # Q(10) = 7.6e-24 and phi(10) = 7.7e-23: beyond this the window contributes nothing
DELTA_EM = 0.2  # below this step Euler-Maclaurin with EM_TERMS corrections is exact to ~1e-17
EM_TERMS = 8
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_MAX_DIRECT = int(2 * W / DELTA_EM) + 4
GL_WIDTH = 1.0  # a window narrower than this (in z) integrates by GL_NODES-point Gauss-Legendre,
GL_NODES = 12  # whose error there is below (1/2)^24 / sqrt(24!), ~1e-19 relative


def _bernoulli_over_factorial(terms: int) -> list[float]:
    """B_{2j} / (2j)! for j = 1..terms (B_2 = 1/6, B_4 = -1/30, ...)."""
    from fractions import Fraction

    bern = [Fraction(1)]
    for m in range(1, 2 * terms + 1):
        bern.append(-sum(Fraction(math.comb(m + 1, k)) * bern[k] for k in range(m)) / (m + 1))
    return [float(bern[2 * j] / math.factorial(2 * j)) for j in range(1, terms + 1)]


_EM_COEF = _bernoulli_over_factorial(EM_TERMS)


@dataclass
class SideSums:
    """``A, B, C`` of one side, each to be multiplied by ``exp(log_scale)``."""

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    log_scale: torch.Tensor


def _scaled_q_phi(z: torch.Tensor, z_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q(z)``, ``phi(z)`` and ``Phi(z)``, times ``exp(z_ref^2/2)``; erfcx keeps tails from underflowing.

    Below zero ``z_ref`` is 0 (the first index lies at or below the mean), so no scaling applies.
    """
    e = torch.exp(-(z * z - z_ref * z_ref) / 2)
    tail = 0.5 * torch.special.erfcx(z.abs() / _SQRT2) * e
    upper = z >= 0
    return torch.where(upper, tail, 1 - tail), _INV_SQRT_2PI * e, torch.where(upper, 1 - tail, tail)


def _direct(p, q, delta, c, z_ref):
    """Term-by-term sums over indices p..q (coarse grids: at most _MAX_DIRECT terms)."""
    count = (q - p + 1).clamp(min=0)
    width = int(count.max().item())
    if width > _MAX_DIRECT:
        raise AssertionError(f"direct window of {width} terms exceeds {_MAX_DIRECT}")
    j = torch.arange(width, dtype=p.dtype, device=p.device)
    i = p.unsqueeze(-1) + j
    live = (j < count.unsqueeze(-1)).to(p.dtype)
    qz, phi, _ = _scaled_q_phi((i - 0.5) * delta.unsqueeze(-1) - c.unsqueeze(-1), z_ref.unsqueeze(-1))
    qz = qz * live
    return qz.sum(-1), ((2 * i - 1) * qz).sum(-1), (phi * live).sum(-1)


def _hermite(z: torch.Tensor, degree: int) -> torch.Tensor:
    """Probabilists' Hermite polynomials He_0..He_degree on a new last axis (phi^(m) = (-1)^m He_m phi)."""
    he = [torch.ones_like(z), z]
    for m in range(1, degree):
        he.append(z * he[m] - m * he[m - 1])
    return torch.stack(he, -1)


def _euler_maclaurin(p, q, delta, c, z_ref):
    """Sums over indices p..q of a fine grid by Euler-Maclaurin: exact integrals + end corrections.

    sum_{i=p..q} G(z_i) = (1/delta) int G + (G(z_p) + G(z_q))/2
                          + sum_j B_2j/(2j)! delta^(2j-1) [G^(2j-1)]_{z_p}^{z_q},
    for G in {Q, (z + c) Q, phi}, whose odd derivatives are Hermite polynomials times phi.
    ``z + c = (i - 1/2) delta`` is taken from the index, never as ``z + c`` (which loses delta
    to the rounding of c when delta << |c|).
    """
    z = torch.stack(((p - 0.5) * delta - c, (q - 0.5) * delta - c))  # [2, N]: both ends at once
    offset = torch.stack(((p - 0.5) * delta, (q - 0.5) * delta))  # z + c at both ends
    qz, phi, cdf = _scaled_q_phi(z, z_ref)
    he = _hermite(z, 2 * EM_TERMS) * phi.unsqueeze(-1)  # He_m(z) phi(z), m = 0..2J
    odd = torch.arange(1, 2 * EM_TERMS, 2, dtype=z.dtype, device=z.device)  # m = 2j - 1
    d_q = -he[..., 0:2 * EM_TERMS:2]  # Q^(m) = -He_{m-1} phi for odd m
    d_phi = -he[..., 1:2 * EM_TERMS:2]  # phi^(m) = -He_m phi for odd m
    q_prev = torch.cat((qz.unsqueeze(-1), he[..., 1:2 * EM_TERMS - 2:2]), -1)  # Q^(m-1)
    d_b = offset.unsqueeze(-1) * d_q + odd * q_prev  # ((z + c) Q)^(m), Leibniz
    weights = torch.tensor(_EM_COEF, dtype=z.dtype, device=z.device) * delta.unsqueeze(-1) ** odd

    def corrections(d):
        return ((d[1] - d[0]) * weights).sum(-1)

    int_q, int_b, int_phi = _integrals(z, qz, phi, cdf, p, q, delta, c, z_ref)
    sum_q = int_q / delta + (qz[0] + qz[1]) / 2 + corrections(d_q)
    sum_b = int_b / delta + (offset[0] * qz[0] + offset[1] * qz[1]) / 2 + corrections(d_b)
    sum_phi = int_phi / delta + (phi[0] + phi[1]) / 2 + corrections(d_phi)
    return sum_q, 2 * sum_b / delta, sum_phi


def _integrals(z, qz, phi, cdf, p, q, delta, c, z_ref):
    """Integrals of Q, (z + c) Q and phi over [z_p, z_q] (scaled like ``_scaled_q_phi``): from
    antiderivatives, or by Gauss-Legendre where the window is narrower than GL_WIDTH and their
    difference would cancel (relative error eps / width, eps / width^2 for (z + c) Q)."""
    int_q = (z[1] * qz[1] - phi[1]) - (z[0] * qz[0] - phi[0])  # antiderivative of Q: z Q - phi
    int_zq = ((z[1] * z[1] - 1) * qz[1] - z[1] * phi[1] - (z[0] * z[0] - 1) * qz[0] + z[0] * phi[0]) / 2
    int_b = int_zq + c * int_q
    int_phi = torch.where(z[1] < 0, cdf[1] - cdf[0], qz[0] - qz[1])
    width = (q - p) * delta
    narrow = width < GL_WIDTH
    if narrow.any():
        nodes, weights = _gauss_legendre(z.dtype, z.device)
        w = width[narrow, None]
        u = (nodes + 1) / 2 * w  # distance from z_p
        gq, gphi, _ = _scaled_q_phi(z[0, narrow, None] + u, z_ref[narrow, None])
        half = w / 2 * weights
        int_q[narrow] = (half * gq).sum(-1)
        int_b[narrow] = (half * ((p[narrow, None] - 0.5) * delta[narrow, None] + u) * gq).sum(-1)
        int_phi[narrow] = (half * gphi).sum(-1)
    return int_q, int_b, int_phi


def _gauss_legendre(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """GL_NODES Gauss-Legendre nodes and weights on [-1, 1]."""
    nodes, weights = _gl_table(GL_NODES)
    return nodes.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


@functools.cache
def _gl_table(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(count)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def side_sums(mu: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> SideSums:
    """A, B, C over i = 1..b for 1-D float64 tensors with sigma > 0 (see the module docstring)."""
    delta = h / sigma
    c = mu / sigma
    z1 = 0.5 * delta - c
    z_ref = z1.clamp(min=0)
    # index bounds of the window [-W, W] (and at least W beyond the first index in a far tail)
    i_left = torch.floor((c - W) / delta + 0.5).clamp(0) .minimum(b)
    upper_z = torch.maximum(torch.full_like(z1, W), z1 + W)
    p = i_left + 1
    # the last index at or below upper_z, and never fewer than the first index after i_left: where
    # W / delta is below an ulp of 1 (lam > ~1e17 sigma) the bound rounds onto an integer and the
    # window, holding the one term that matters, came out empty (k = 0/0)
    q = torch.minimum(b, torch.floor((upper_z + c) / delta + 0.5).maximum(p))
    # left of the window Q = 1 exactly in double precision: sum 1 and sum (2i-1) in closed form
    A = i_left.clone()
    B = i_left * i_left
    C = torch.zeros_like(i_left)
    has_window = p <= q
    # few terms: summed one by one, exact whatever delta (a narrow window of a fine grid, too)
    fine = has_window & (q - p + 1 > _MAX_DIRECT)
    coarse = has_window & ~fine
    for mask, method in ((coarse, _direct), (fine, _euler_maclaurin)):
        if mask.any():
            args = (p[mask], q[mask], delta[mask], c[mask], z_ref[mask])
            a_, b_, c_ = method(*args)
            A[mask] += a_
            B[mask] += b_
            C[mask] += c_
    return SideSums(A, B, C, -z_ref * z_ref / 2)
