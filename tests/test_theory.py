import math

import numpy as np
import pytest
import torch

from hmtconv.theory import fixed_point_lam, k_factor, optimal_lam, quantization_error
from reference import f_quantizer, k_eq29, qe_numeric

CASES = [  # (mu, sigma, n, T, lam): coarse and fine grids, both tails, clipping inside the bulk
    (0.3, 1.0, 1, 1, 2.0), (0.3, 1.0, 2, 4, 0.9), (-0.7, 0.5, 4, 4, 0.2), (1.5, 0.4, 4, 16, 0.15),
    (0.0, 1.0, 8, 2, 0.02), (2.0, 0.3, 3, 8, 0.5), (-2.5, 1.0, 4, 2, 0.4), (0.1, 2.0, 8, 16, 0.01),
    (5.0, 1.0, 2, 1, 3.0), (0.2, 0.05, 4, 4, 0.011),
]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mu,sigma,n,T,lam", CASES)
def test_k_factor_equals_eq29_term_by_term(mu, sigma, n, T, lam, signed):
    b = T * (2**n - 1)
    expected = k_eq29(lam, mu, sigma, T, -b if signed else 0, b)
    got = k_factor(lam, mu, sigma, n, T, signed).item()
    assert got == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mu,sigma,n,T,lam", CASES)
def test_quantization_error_equals_quadrature(mu, sigma, n, T, lam, signed):
    expected = qe_numeric(lam, mu, sigma, n, T, signed)
    got = quantization_error(lam, mu, sigma, n, T, signed).item()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("signed", [False, True])
def test_quantization_error_matches_monte_carlo(signed):
    rng = np.random.default_rng(0)
    mu, sigma, n, T, lam = 0.4, 1.0, 3, 4, 0.6
    x = rng.normal(mu, sigma, 2_000_000)
    err = (f_quantizer(x, lam, n, T, signed) - (x if signed else np.maximum(x, 0))) ** 2
    standard_error = err.std() / math.sqrt(x.size)
    got = quantization_error(lam, mu, sigma, n, T, signed).item()
    assert abs(got - err.mean()) < 4 * standard_error


def _brute_force_minimizer(mu, sigma, n, T, signed, around):
    """Dense log grid of lam, then golden-section refinement of quantization_error."""
    def qe(lam):
        return quantization_error(lam, mu, sigma, n, T, signed)

    grid = around * torch.logspace(-1, 1, 801, base=4, dtype=torch.float64)
    i = int(torch.argmin(qe(grid)))
    lo, hi = grid[max(i - 1, 0)].item(), grid[min(i + 1, len(grid) - 1)].item()
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if qe(a) < qe(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mu,sigma,n,T", [
    (0.3, 1.0, 1, 1), (0.3, 1.0, 2, 4), (-0.7, 0.5, 4, 4), (1.5, 0.4, 4, 16), (0.0, 1.0, 8, 2),
    (2.0, 0.3, 3, 8), (-1.5, 1.0, 4, 2), (0.1, 2.0, 8, 16),
])
def test_optimal_lam_is_the_brute_force_minimizer(mu, sigma, n, T, signed):
    lam = optimal_lam(mu, sigma, n, T, signed).item()
    assert k_factor(lam, mu, sigma, n, T, signed).item() == pytest.approx(1.0, abs=1e-10)
    brute = _brute_force_minimizer(mu, sigma, n, T, signed, lam)
    assert lam == pytest.approx(brute, rel=2e-5)
    # Lemma 4.7: k > 1 below the optimum, k < 1 above it
    assert k_factor(lam * 0.97, mu, sigma, n, T, signed) > 1 > k_factor(lam * 1.03, mu, sigma, n, T, signed)


@pytest.mark.parametrize("signed", [False, True])
def test_optimal_lam_is_the_global_minimizer_for_inputs_narrow_against_the_levels(signed):
    """Few levels and |mu| >> sigma: the error has a local minimum per level the mean can sit on.
    optimal_lam must reach the least error of a dense log grid (brute force over 1e-4..1e4 x
    the scale of the input), within 0.5 % (one valley in the scan is narrower than our grid)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(48, generator=g, dtype=torch.float64) * 30 - (0 if signed else 5)
    n = torch.randint(1, 5, (48,), generator=g)
    T = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (48,), generator=g)]
    lam = optimal_lam(mu, 1.0, n, T, signed)
    grid = (mu.abs()[:, None] + 3) * torch.logspace(-4, 4, 4001, dtype=torch.float64)
    brute = quantization_error(grid, mu[:, None], 1.0, n[:, None], T[:, None], signed).amin(1)
    ours = quantization_error(lam, mu, 1.0, n, T, signed)
    assert torch.all(ours <= brute * (1 + 5e-3) + 1e-12), (ours / brute).max()  # (one valley narrower than the grid)
    assert optimal_lam(16.0, 1.0, 4, 1, False).item() == pytest.approx(1.197, rel=1e-3)  # not the root at 5.33


def test_optimal_lam_broadcasts_and_handles_extremes():
    mu = torch.tensor([[0.0], [40.0], [-40.0], [1e4]], dtype=torch.float64)
    sigma = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    for signed in (False, True):
        for n, T in ((1, 1), (16, 1024), (8, 16)):
            lam = optimal_lam(mu, sigma, n, T, signed)
            assert lam.shape == (4, 2)
            assert torch.isfinite(lam).all() and (lam > 0).all()
            k = k_factor(lam, mu, sigma, n, T, signed)
            exact = signed | (mu / sigma >= -100)  # deeper dead ReLUs use the exponential-tail limit
            assert torch.allclose(k[exact], torch.ones_like(k[exact]), atol=1e-9), (signed, n, T, k)


def test_deep_tail_relu_follows_the_exponential_limit():
    # lam ~ sigma^2 / |mu| as the positive part of the input becomes exponential
    lam = optimal_lam(torch.tensor([-60.0, -100.0, -1000.0, -1e5]), 1.0, 4, 4, signed=False)
    scaled = lam * torch.tensor([60.0, 100.0, 1000.0, 1e5], dtype=torch.float64)
    assert torch.allclose(scaled, scaled[1].expand(4), rtol=2e-3)


def test_optimal_lam_point_mass():
    # sigma = 0: lam puts mu on the top level, so every step outputs mu exactly (eq. 20)
    lam = optimal_lam(torch.tensor([2.0, -3.0, 0.0]), 0.0, 4, 8, signed=True)
    assert torch.allclose(lam, torch.tensor([2.0 / 15, 3.0 / 15, 1.0], dtype=torch.float64))
    assert quantization_error(lam[:2], torch.tensor([2.0, -3.0]), 0.0, 4, 8, True).abs().max() < 1e-24
    # ReLU with mu <= 0: the neuron never fires whatever lam is; a finite documented value
    assert optimal_lam(-1.0, 0.0, 4, 8, signed=False).item() == 1.0


@pytest.mark.parametrize("signed", [False, True])
def test_a_spread_too_small_to_square_next_to_mu_is_a_point_mass(signed):
    """(mu / sigma)^2 overflowed float64 below sigma = 1e-154 |mu|: lam jumped to 8 (top level 120,
    error mu^2) and k and the error were NaN. The limit sigma -> 0 is continuous there."""
    tiny, small = optimal_lam(1.0, 1e-160, 4, 4, signed), optimal_lam(1.0, 1e-140, 4, 4, signed)
    point = optimal_lam(1.0, 0.0, 4, 4, signed)
    assert tiny.item() == point.item() and small.item() == pytest.approx(point.item(), rel=0.3)
    assert k_factor(tiny, 1.0, 1e-160, 4, 4, signed).item() == pytest.approx(1.0)
    h = 0.07 / 4  # eq. 20: levels of lam / T, the nearest to mu = 1 of the 4 * 15 is 57
    assert quantization_error(0.07, 1.0, 1e-160, 4, 4, signed).item() == pytest.approx((57 * h - 1) ** 2)
    assert fixed_point_lam(1.0, 1e-160, 4, 4, signed).item() == point.item()


def test_optimal_lam_relative_accuracy_1e9():
    mu, sigma, n, T = 0.37, 0.81, 8, 16
    lam = optimal_lam(mu, sigma, n, T, True).item()
    # the root of k = 1 by bisection in extended steps, independently of the solver
    lo, hi = lam * 0.9, lam * 1.1
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if k_eq29(mid, mu, sigma, T, -T * 255, T * 255) > 1:
            lo = mid
        else:
            hi = mid
    assert lam == pytest.approx(math.sqrt(lo * hi), rel=1e-9)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mu,sigma,steps", [(0.5, 0.8, 25), (0.5e12, 1e12, 1500)])
def test_fixed_point_is_algorithm_1(signed, mu, sigma, steps):
    """Against Algorithm 1 literally (eq. 29 as printed). The second case is opt1500 on a site with
    sigma >= 1e8: theta0 = 1 starts 1e-12 sigma, where k was garbage (NaN lam at sigma = 1e12, 7 %
    off at 1e9)."""
    n, T = 4, 4
    b = T * (2**n - 1)
    theta = 1.0
    for _ in range(steps):
        theta = k_eq29(theta, mu, sigma, T, -b if signed else 0, b) * theta
    got = fixed_point_lam(mu, sigma, n, T, signed, steps=steps).item()
    assert got == pytest.approx(theta, rel=1e-10)


def test_fixed_point_is_far_from_the_optimum_at_n8():
    """The published 1,500 steps stop short: at n = 8, T = 16 lam stays several times too large."""
    mu, sigma = 0.2, 1.0
    fixed = fixed_point_lam(mu, sigma, 8, 16, True).item()
    best = optimal_lam(mu, sigma, 8, 16, True).item()
    assert fixed > 2 * best
    assert quantization_error(fixed, mu, sigma, 8, 16, True) > quantization_error(best, mu, sigma, 8, 16, True)


def test_mt_levels_override():
    # the prior-work MT neuron: n levels of theta/n per step -> b = T n
    lam = optimal_lam(0.5, 1.0, 4, 4, False, levels=4)
    assert k_eq29(lam.item(), 0.5, 1.0, 4, 0, 16) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("bad,match", [
    (dict(lam=-1.0), "lam"), (dict(sigma=-0.1), "sigma"), (dict(T=0), "T"), (dict(n=0), "n"),
    (dict(n=17), "n"),
])
def test_invalid_arguments(bad, match):
    args = dict(lam=0.5, mu=0.0, sigma=1.0, n=4, T=4, signed=True) | bad
    with pytest.raises(ValueError, match=match):
        quantization_error(**args)


@pytest.mark.parametrize("bad,match", [  # each returned NaN or an unconverged lam
    (dict(mu=float("nan")), "mu must be finite"), (dict(levels=-3), "levels must be positive integers"),
    (dict(rtol=-1.0), "rtol > 0"), (dict(max_iter=0), "max_iter >= 1")])
def test_the_solvers_refuse_what_they_cannot_answer(bad, match):
    args = dict(mu=0.0, sigma=1.0, n=4, T=4, signed=False) | bad
    with pytest.raises(ValueError, match=match):
        optimal_lam(**args)
    with pytest.raises(ValueError, match="steps >= 0"):
        fixed_point_lam(0.0, 1.0, 4, 4, False, steps=-1)


def _k_erfc(lam, mu, sigma, n, T, signed):
    """Eq. 29 term by term with erf = 1 - erfc (no cancellation where every erf is near 1)."""
    def erfc(z):  # (torch's, in float64: a test dependency less than scipy's)
        return torch.special.erfc(torch.from_numpy(z)).numpy()

    b, h = T * (2**n - 1), lam / T
    i = np.arange(1, b + 1, dtype=np.float64)
    xf = ff = 0.0
    for m in ((mu, -mu) if signed else (mu,)):  # the signed quantizer is odd: both one-sided halves
        z = ((i - 0.5) * h - m) / sigma
        q = 0.5 * erfc(z / math.sqrt(2))
        xf += m * q.sum() + sigma * np.exp(-z * z / 2).sum() / math.sqrt(2 * math.pi)
        ff += ((2 * i - 1) * q).sum()
    return xf / (h * ff)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("lam,mu,n,T", [  # levels far finer than sigma: few (<= 200) or many terms
    (1e-15, 3.0, 1, 1), (1e-12, 0.0, 4, 4), (1e-9, 0.5, 2, 16), (1e-6, -0.5, 8, 2), (1e-6, 3.0, 4, 4),
    (1e-9, 0.3, 16, 2), (1e-7, -0.2, 14, 4),
])
def test_k_factor_on_grids_much_finer_than_sigma(lam, mu, n, T, signed):
    """Was: Euler-Maclaurin on any grid finer than 0.2 sigma, whose integrals are differences of
    nearly equal antiderivatives over such a narrow window: k negative or off by 59x at
    lam = 1e-9 sigma (n = 4, T = 4), 1.5e-7 relative with 131,070 terms 5e-10 sigma apart."""
    got = k_factor(lam, mu, 1.0, n, T, signed).item()
    assert got == pytest.approx(_k_erfc(lam, mu, 1.0, n, T, signed), rel=1e-12)


@pytest.mark.parametrize("mu,n,T,signed", [(1000.0, 1, 4096, False), (1769.0, 3, 512, False), (-1194.0, 2, 1024, True),
                                            (-1802.0, 7, 32, True)])
def test_optimal_lam_converges_where_log_k_is_flat_above_the_root(mu, n, T, signed):
    """|mu| >> sigma: log k ~ -5e-9 for a factor 2 of lam above the root, where regula falsi crept
    and stopped after max_iter at k = 1 - 5e-9, 0.1 % from the root (0.2 % more error). Lemma 4.7
    against eq. 29 as printed: k changes sign across the returned lam."""
    lam = optimal_lam(mu, 1.0, n, T, signed).item()
    b = T * (2**n - 1)
    a = -b if signed else 0
    assert k_eq29(lam * (1 - 1e-6), mu, 1.0, T, a, b) > 1 > k_eq29(lam * (1 + 1e-6), mu, 1.0, T, a, b)


@pytest.mark.parametrize("signed", [False, True])
def test_optimal_lam_of_an_input_does_not_depend_on_the_others_in_the_call(signed):
    """compute_lams solves all sites of a model in one call. The coarse grid (valleys.py) took the
    coarsest step any input in the call needed, so a narrow input's lam changed (to another local
    minimum: 12.2193 alone, 12.6402 beside mu = 319.1, n = 9, T = 2)."""
    mu = torch.tensor([183.28257214096953, 319.10502536596795], dtype=torch.float64)
    n, T = torch.tensor([4, 9]), torch.tensor([2, 2])
    together = optimal_lam(mu, 1.0, n, T, signed)
    alone = torch.stack([optimal_lam(mu[i], 1.0, n[i], T[i], signed) for i in range(2)])
    assert torch.allclose(together, alone, rtol=1e-9, atol=0)


@pytest.mark.parametrize("ratio", [1e14, 1e18, 1e30, 1e100])
@pytest.mark.parametrize("c", [0.0, 3.0, -3.0])
def test_k_factor_for_levels_far_wider_than_sigma(ratio, c):
    """lam >> sigma: only the first level fires, k = mu / h + (sigma / h) sqrt(2/pi) / erfcx(z1 / sqrt 2)
    (the Mills ratio, z1 = (h/2 - mu) / sigma). From lam ~ 1e17 sigma the window's bound rounded onto
    an integer and held no term: k = 0/0 = NaN, and opt1500 NaN for sigma < ~1e-17 (theta0 = 1)."""
    sigma, lam, T = 1.0 / ratio, 1.0, 4
    mu, h = c * sigma, lam / T
    mills = torch.special.erfcx(torch.tensor((h / 2 - mu) / sigma / math.sqrt(2), dtype=torch.float64)).item()
    expected = mu / h + sigma / h * math.sqrt(2 / math.pi) / mills
    assert k_factor(lam, mu, sigma, 4, T, False).item() == pytest.approx(expected, rel=1e-13)
    assert math.isfinite(fixed_point_lam(mu, sigma, 4, T, False, steps=200).item())


@pytest.mark.parametrize("signed", [False, True])
def test_narrow_inputs_are_gridded_in_chunks_with_the_same_result(signed, monkeypatch):
    """valleys.py evaluates at most GRID_BUDGET grid points at once (a model's narrow channels
    in one call took ~0.45 MB each: 1.6 GB for 2,048 channels at n = 5, mu = 10 sigma); each
    input has its own grid, so one point per chunk must give the lams of one chunk for all."""
    import hmtconv.theory.valleys as valleys

    g = torch.Generator().manual_seed(3)
    mu = torch.rand(12, generator=g, dtype=torch.float64) * 60 - (0 if signed else 10)
    n, T = torch.randint(2, 7, (12,), generator=g), torch.tensor([1, 2, 4])[torch.randint(0, 3, (12,), generator=g)]
    whole = optimal_lam(mu, 1.0, n, T, signed)
    monkeypatch.setattr(valleys, "GRID_BUDGET", 1)
    assert torch.allclose(optimal_lam(mu, 1.0, n, T, signed), whole, rtol=1e-12, atol=0)
