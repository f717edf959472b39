"""Expected conversion error (eqs. 9, 23) and the k factor of eq. 29 for Gaussian inputs.

Mapping of eq. 24 onto the neuron (eq. 20): ``N = T``, ``theta = lam``, ``b = T * levels``
with ``levels = 2**n - 1``, and ``a = -b`` (signed, target y = x) or ``a = 0`` (ReLU, target
max(x, 0)). So f is a uniform quantizer of step ``h = lam / T`` with integer levels in [a, b].

Both errors split into one-sided parts: with ``L`` the level of x,
``E[(f - x)^2] = side(mu) + side(-mu)`` for the signed neuron (f is odd), and the ReLU error
is ``side(mu)`` alone, where ``side(mu) = E[x^2; x > 0] - 2 h E[x L] + h^2 E[L^2]`` over
``x ~ N(mu, sigma^2)``. The expectations are the sums of ``gaussian_sums``.

``quantization_error`` is the expectation E[(f(x) - target(x))^2]; the paper's integrals
(eqs. 9, 23) omit the density's normalization and equal it times ``sqrt(2 pi) sigma``.
It is a difference of nearly equal terms for very fine grids (``lam / T << sigma``: relative
accuracy about ``1e-16 * 12 * (sigma * T / lam)**2``) and for ReLU inputs far below zero (at
``mu = -20 sigma`` the error, about 1e-99 sigma^2, is off by tens of percent). ``k_factor``, whose
root sets the thresholds, is a ratio of sums without that cancellation.
"""
from __future__ import annotations

import math

import torch

from .gaussian_sums import side_sums

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def levels_for(n, levels=None) -> torch.Tensor:
    """Per-step maximum level: ``2**n - 1`` for H-MT, or an explicit override (n for MT)."""
    if levels is not None:
        levels = torch.as_tensor(levels, dtype=torch.float64)
        if not ((levels >= 1) & (levels == torch.round(levels))).all():
            raise ValueError(f"levels must be positive integers, got {levels}")
        return levels
    n = torch.as_tensor(n, dtype=torch.float64)
    if ((n < 1) | (n > 16) | (n != torch.round(n))).any():
        raise ValueError(f"n must be an integer in [1, 16], got {n}")
    return 2.0**n - 1


def broadcast64(*values) -> list[torch.Tensor]:
    """Float64 tensors broadcast to one shape, on the device of the first tensor among ``values``
    (a number made a CPU tensor and expanded to a CUDA tensor's shape is no scalar: ops mixing
    them fail)."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    return list(torch.broadcast_tensors(*[torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]))


def _check(lam=None, sigma=None, T=None, mu=None):
    if mu is not None and not torch.isfinite(mu).all():
        raise ValueError(f"mu must be finite, got {mu[~torch.isfinite(mu)][0].item()}")
    if lam is not None and not ((lam > 0) & torch.isfinite(lam)).all():
        raise ValueError(f"lam must be finite and > 0, got {lam[~((lam > 0) & torch.isfinite(lam))][0].item()}")
    if sigma is not None and not ((sigma >= 0) & torch.isfinite(sigma)).all():
        bad = ~((sigma >= 0) & torch.isfinite(sigma))
        raise ValueError(f"sigma must be finite and >= 0, got {sigma[bad][0].item()}")
    if T is not None and ((T < 1) | (T != torch.round(T))).any():
        raise ValueError(f"T must be a positive integer, got {T[(T < 1) | (T != torch.round(T))][0].item()}")


POINT_MASS = 1e-150  # sigma below |mu| times this is a point mass: (mu / sigma)^2 would overflow float64


def is_point_mass(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Where N(mu, sigma^2) is taken as the point mass at mu (sigma = 0, or so small next to mu
    that float64 cannot square their ratio; float32 data never comes near that)."""
    return (sigma == 0) | (sigma < mu.abs() * POINT_MASS)


def positive_part_second_moment(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x^2; x > 0] for x ~ N(mu, sigma^2) (sigma may be 0)."""
    point = is_point_mass(mu, sigma)
    safe = torch.where(point, torch.ones_like(sigma), sigma)
    c = mu / safe
    cdf = 0.5 * torch.special.erfc(-c / math.sqrt(2.0))
    gauss = (mu * mu + sigma * sigma) * cdf + mu * sigma * _INV_SQRT_2PI * torch.exp(-c * c / 2)
    return torch.where(point, mu.clamp(min=0) ** 2, gauss)


def moments(mu, sigma, h, b, signed: bool):
    """``(E[x f]/h, E[f^2]/h^2, log_scale)`` of the quantizer, each scaled by exp(-log_scale).

    A point mass (``is_point_mass``: sigma = 0) is handled exactly. The scaling keeps far-tail ratios
    finite; multiply by ``exp(log_scale)`` for the true values.
    """
    mu, sigma, h, b = broadcast64(mu, sigma, h, b)
    shape = mu.shape
    mu, sigma, h, b = (t.reshape(-1) for t in (mu, sigma, h, b))
    sides = (1.0, -1.0) if signed else (1.0,)
    xf, ff, logs = [], [], []
    for sign in sides:
        m = sign * mu
        point = is_point_mass(m, sigma)
        sums = side_sums(m, torch.where(point, torch.ones_like(sigma), sigma), h, b)
        level = torch.floor(m / h + 0.5).clamp(0).minimum(b)
        xf.append(torch.where(point, m * level, m * sums.A + sigma * sums.C))
        ff.append(torch.where(point, level * level, sums.B))
        logs.append(torch.where(point, torch.zeros_like(m), sums.log_scale))
    top = torch.stack(logs).amax(0)
    weights = [torch.exp(ls - top) for ls in logs]
    s_xf = sum(w * v for w, v in zip(weights, xf))
    s_ff = sum(w * v for w, v in zip(weights, ff))
    return s_xf.reshape(shape), s_ff.reshape(shape), top.reshape(shape)


def k_factor(lam, mu, sigma, n, T, signed: bool, levels=None) -> torch.Tensor:
    """Eq. 29: ``k = E[x f] / E[f^2]``, the rescaling of lam that lowers the error (Lemma 4.4).

    NaN only where it is undefined: a point mass (sigma = 0) with f(mu) = 0.
    """
    lam, mu, sigma, T = broadcast64(lam, mu, sigma, T)
    _check(lam, sigma, T)
    b = T * levels_for(n, levels)
    h = lam / T
    s_xf, s_ff, _ = moments(mu, sigma, h, b, signed)
    return s_xf / (h * s_ff)


def quantization_error(lam, mu, sigma, n, T, signed: bool, levels=None) -> torch.Tensor:
    """E[(f(x) - target(x))^2] of eq. 23 (signed, target x) or eq. 9 (ReLU, target max(x, 0)), in
    closed form (its accuracy: the module docstring)."""
    lam, mu, sigma, T = broadcast64(lam, mu, sigma, T)
    _check(lam, sigma, T)
    b = T * levels_for(n, levels)
    h = lam / T
    s_xf, s_ff, log_scale = moments(mu, sigma, h, b, signed)
    scale = torch.exp(log_scale)
    target = positive_part_second_moment(mu, sigma)
    if signed:
        target = target + positive_part_second_moment(-mu, sigma)
    gaussian = (target - 2 * h * s_xf * scale + h * h * s_ff * scale).clamp(min=0)
    # a point mass (sigma = 0) directly, without the cancellation of the expanded square
    level = torch.floor(mu / h + 0.5).clamp(-b if signed else 0).minimum(b)
    point = (h * level - (mu if signed else mu.clamp(min=0))) ** 2
    return torch.where(is_point_mass(mu, sigma), point, gaussian)
