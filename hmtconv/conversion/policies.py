"""Threshold policies: calibration statistics -> lam (lambda_min, the smallest threshold).

A policy is a function ``(observer, spec) -> lam`` registered by name (timm-style registry), so
one calibration serves every policy, n and T. ``spec.levels`` is the largest level a step can
emit: ``2**n - 1`` for H-MT (eq. 20's clip bound), ``n`` for the prior-work MT neuron (whose step
is ``theta/n``, so its ``theta = n * lam``), 1 for IF.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from functools import partial
from typing import Callable, Iterable

import torch

from ..theory import fixed_point_lam, optimal_lam
from .histograms import HistogramConfig
from .observers import ActivationObserver, MissingHistograms, lam_shape

# Thresholds below this are treated as "dead unit": a channel that never fired in calibration.
MIN_LAM = 1e-8


@dataclass(frozen=True)
class NeuronSpec:
    kind: str          # "hmt", "if" or "mt"
    n: int             # thresholds of the neuron (1 for "if")
    T: int             # time steps the threshold is optimized for (eq. 24's N)
    signed: bool       # y = x site (signed H-MT) rather than ReLU
    per_channel: bool  # granularity == "channel"

    @property
    def levels(self) -> int:
        return self.n if self.kind == "mt" else 2**self.n - 1

    @property
    def theory_levels(self) -> int | None:
        """``levels`` override for hmtconv.theory (None = the H-MT default 2**n - 1)."""
        return self.n if self.kind == "mt" else None


Policy = Callable[[ActivationObserver, NeuronSpec], torch.Tensor]
POLICIES: dict[str, Policy] = {}
# Policies whose lam depends on T (eq. 24 has N = T): comparing them at several T takes one
# conversion per T; the others serve every t <= T from one run.
T_DEPENDENT: set[str] = set()
# Policies that read the observers' moments and maxima only: a calibration for them alone skips
# the histograms, the costliest statistics to gather (convert(model, loader) does).
NO_HISTOGRAM: set[str] = set()


def register_policy(name: str, *, t_dependent: bool = False, histogram: bool = True) -> Callable[[Policy], Policy]:
    """Register ``fn(observer, spec) -> lam`` under ``name``; a policy that reads ``spec.T`` must
    say ``t_dependent=True`` (sweeps otherwise serve every T from the largest T's thresholds), and
    one that reads only ``obs.moments`` and ``obs.maximum`` may say ``histogram=False`` (a one-shot
    ``convert(model, loader, policy=name)`` then gathers no histograms)."""
    if not isinstance(name, str):
        raise TypeError(f"register_policy takes the policy's name first, @register_policy('name'), got {name!r}")
    if not name or any(c in name for c in ",= \t") or (_is_number(name) and 0 < float(name) <= 100):
        raise ValueError(f"threshold policy name {name!r} cannot be used in a policy string: give a name without "
                         f"',', '=' or spaces that is not a percentile (a number in (0, 100])")

    def add(fn: Policy) -> Policy:
        if name in POLICIES:
            raise ValueError(f"threshold policy {name!r} is already registered")
        POLICIES[name] = fn
        if t_dependent:
            T_DEPENDENT.add(name)
        if not histogram:
            NO_HISTOGRAM.add(name)
        return fn
    return add


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def gaussian_policy(solver: Callable, doc: str) -> Policy:
    """A policy that solves for the Gaussian fit (mu, sigma) of the site's input with ``solver``
    (a ``hmtconv.theory`` function); ``compute_lams`` batches many sites into one call of it."""
    def policy(obs: ActivationObserver, spec: NeuronSpec) -> torch.Tensor:
        mu, sigma = obs.moments(spec.per_channel)
        return solver(mu, sigma, spec.n, spec.T, spec.signed, levels=spec.theory_levels)
    policy.solver, policy.__doc__ = solver, doc
    return policy


register_policy("opt", t_dependent=True, histogram=False)(gaussian_policy(
    optimal_lam, "Converged optimum of eq. 23 (root of k(theta) = 1, eq. 29; Lemma 4.7)."))
register_policy("opt1500", t_dependent=True, histogram=False)(gaussian_policy(
    partial(fixed_point_lam, steps=1500),
    "Algorithm 1 run for exactly 1,500 steps from theta = 1, as the published code does."))


@register_policy("opt-emp", t_dependent=True)
def empirical_optimum(obs: ActivationObserver, spec: NeuronSpec) -> torch.Tensor:
    """Minimum of eq. 24's error over the calibration histogram itself (no Gaussian fit)."""
    from .empirical import empirical_lam
    counts, lo, hi = obs.histogram(spec.per_channel)
    vmax = obs.maximum(spec.per_channel).reshape(-1).cpu()
    lam = empirical_lam(counts, lo, hi, vmax, spec.levels, spec.T)
    return lam if spec.per_channel else lam[0]


def percentile_policy(percent: float, scale: float = 1.0) -> Policy:
    """``lam = scale * q_percent(output activation) / levels`` (the paper's "999" with 99.9)."""
    if not 0 < percent <= 100:
        hint = " (the paper's 99.9 % percentile is the policy \"999\", a string)" if percent == 999 else ""
        raise ValueError(f"percentile policy needs a percent in (0, 100], got {percent!r}{hint}")

    def policy(obs: ActivationObserver, spec: NeuronSpec) -> torch.Tensor:
        return scale * obs.quantile(percent / 100, spec.per_channel) / spec.levels
    return policy


register_policy("999")(percentile_policy(99.9))
register_policy("999x2")(percentile_policy(99.9, scale=2.0))


@register_policy("max", histogram=False)
def maximum(obs: ActivationObserver, spec: NeuronSpec) -> torch.Tensor:
    return obs.maximum(spec.per_channel) / spec.levels


def parse_policy(policy: str | float) -> tuple[str | float, list[tuple[str, str | float]]]:
    """``"opt"``, ``99.99`` or ``"opt,*.mix_in0=999"`` -> (base policy, [(pattern, policy), ...]).

    After the base policy, ``PATTERN=POLICY`` items give sites whose qualified name (as results
    list it: ``SNN.sites()``, ``result.per_layer``) matches the fnmatch ``PATTERN`` another policy; the last
    matching item wins. Every policy is checked here, so a typo fails before any work.
    """
    if isinstance(policy, bool) or not isinstance(policy, (str, int, float)):
        raise TypeError(f"policy must be a name, a float percentile or 'BASE,PATTERN=POLICY,...', got {policy!r}")
    if not isinstance(policy, str):
        resolve_policy(policy)
        return policy, []
    base, *items = (part.strip() for part in policy.split(","))
    if "=" in base:
        raise ValueError(f"policy {policy!r}: starts with the override {base!r}; give the policy of every other "
                         f"site first, e.g. 'opt,{base}'")
    overrides = []
    for item in items:
        pattern, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not pattern or not name:
            raise ValueError(f"policy {policy!r}: {item!r} is not PATTERN=POLICY (e.g. '*.mix_in0=999')")
        overrides.append((pattern, _one_policy(name, f"policy {policy!r}: in {item!r}: " if items else "")))
    base = _one_policy(base, f"policy {policy!r}: the base {base!r}: " if items else "")
    return base, overrides


def _one_policy(text: str, where: str = "") -> str | float:
    """A registered name, or a percentile written as a number; ``where`` prefixes an error with the
    part of a longer policy string it is about."""
    try:
        value = text if text in POLICIES else float(text)
    except ValueError:
        value = text  # resolve_policy names the registered choices
    try:
        resolve_policy(value)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    return value


def policy_for_site(policy: str | float, name: str) -> str | float:
    """The policy that applies to the site ``name`` (see :func:`parse_policy`)."""
    base, overrides = parse_policy(policy)
    return next((p for pattern, p in reversed(overrides) if fnmatchcase(name, pattern)), base)


def unused_patterns(policy: str | float, names: list[str]) -> list[str]:
    """Override patterns of ``policy`` that match none of ``names`` (a typo would silently do nothing)."""
    return [pattern for pattern, _ in parse_policy(policy)[1] if not any(fnmatchcase(n, pattern) for n in names)]


def _named(policy: str | float) -> list[str | float]:
    """Every policy a policy string applies somewhere: its base and its overrides'."""
    base, overrides = parse_policy(policy)
    return [base, *(p for _, p in overrides)]


def depends_on_T(policy: str | float) -> bool:
    """Whether any site's lam depends on T (one conversion per T is then needed)."""
    return any(p in T_DEPENDENT for p in _named(policy))


def reads_histograms(policy: str | float) -> bool:
    """Whether any site's policy reads the observers' histograms (percentiles, opt-emp, and
    registered policies that do not say otherwise)."""
    return any(p not in NO_HISTOGRAM for p in _named(policy))


def histograms_for(policies: Iterable[str | float], per_channel: bool) -> HistogramConfig | None:
    """The histograms a calibration for ``policies`` alone must gather: none where each reads
    moments and maxima only, per-channel ones only for per-channel thresholds (a layer's
    percentiles are the same from either)."""
    return HistogramConfig(per_channel=per_channel) if any(reads_histograms(p) for p in policies) else None


def resolve_policy(policy: str | float) -> Policy:
    if isinstance(policy, bool):
        raise TypeError(f"policy must be a name or a float percentile, got {policy!r}")
    if isinstance(policy, (int, float)):
        return percentile_policy(float(policy))
    if policy not in POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}; choose one of {sorted(POLICIES)} "
                         f"or a float percentile such as 99.99")
    return POLICIES[policy]


def compute_lams(requests: list[tuple[ActivationObserver, NeuronSpec, str | float]]) -> list[torch.Tensor]:
    """lam for each ``(observer, spec, policy)``, shaped to broadcast over one step (``[C, 1, 1]``,
    ``[C]`` or scalar). Gaussian policies solve all sites of one kind in one call: their cost is
    per-op overhead (1,500 iterations of a dozen ops for opt1500), the same for one site as for
    hundreds, so a whole model takes the time of one site."""
    raw: dict[tuple[int, bool], torch.Tensor] = {}  # (request, per channel) -> policy output
    batches = defaultdict(list)  # (solver, n, T, signed, levels) -> [(key, mu, sigma)]
    for i, (obs, spec, policy) in enumerate(requests):
        rule = resolve_policy(policy)
        # per channel also needs the layer's lam, for channels that never fired (see below)
        for per_channel in {spec.per_channel, False}:
            one = replace(spec, per_channel=per_channel)
            if hasattr(rule, "solver"):
                mu, sigma = obs.moments(per_channel)
                batches[rule.solver, one.n, one.T, one.signed, one.theory_levels].append(((i, per_channel), mu, sigma))
            else:
                try:
                    value = rule(obs, one)
                except MissingHistograms as error:
                    if policy in BUILT_IN or policy not in NO_HISTOGRAM:
                        raise
                    raise ValueError(f"threshold policy {policy!r} was registered with histogram=False but reads "
                                     f"the histograms ({error}); register it without histogram=False") from None
                raw[i, per_channel] = _user_checked(value, obs, one, policy)
    for (solver, n, T, signed, levels), items in batches.items():
        mu = torch.cat([m.reshape(-1) for _, m, _ in items])
        sigma = torch.cat([s.reshape(-1) for _, _, s in items])
        lams = solver(mu, sigma, n, T, signed, levels=levels).split([m.numel() for _, m, _ in items])
        raw.update({key: lam.reshape(m.shape) for (key, m, _), lam in zip(items, lams)})
    return [_finish(raw[i, spec.per_channel], raw[i, False], obs, spec) for i, (obs, spec, _) in enumerate(requests)]


def compute_lam(obs: ActivationObserver, spec: NeuronSpec, policy: str | float) -> torch.Tensor:
    """:func:`compute_lams` for one site."""
    return compute_lams([(obs, spec, policy)])[0]


def _user_checked(value, obs: ActivationObserver, spec: NeuronSpec, policy: str | float) -> torch.Tensor:
    """A policy's output as float64; a registered policy of the user's must give finite lam >= 0,
    one per layer or one per channel (the built-in ones leave NaN where a channel never fired,
    which _finish settles)."""
    if policy in BUILT_IN or not isinstance(policy, str):
        return torch.as_tensor(value, dtype=torch.float64)
    size = obs.maximum(True).numel() if spec.per_channel else 1
    where = f"threshold policy {policy!r} at {obs.label} ({'per channel' if spec.per_channel else 'per layer'})"
    try:
        lam = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{where} returned {value!r}, not a number or tensor: {error}") from None
    if lam.numel() != size:
        raise ValueError(f"{where} returned {lam.numel()} values; it must return {size} (shape "
                         f"{'[C]' if spec.per_channel else '[]'})")
    if not (torch.isfinite(lam) & (lam >= 0)).all():  # (0, where nothing fired, is settled as the built-ins' is)
        raise ValueError(f"{where} returned lam {lam.flatten()[:4].tolist()}...: lam must be finite and >= 0")
    return lam.reshape(-1 if spec.per_channel else ()).to(obs.count.device)


def _finish(lam: torch.Tensor, layer: torch.Tensor, obs: ActivationObserver, spec: NeuronSpec) -> torch.Tensor:
    lam = torch.nan_to_num(lam, nan=0.0)
    if spec.per_channel:
        # A channel whose output was always 0 in calibration would get a vanishing threshold and
        # then fire at full rate on its first positive input: it takes the layer's lam instead.
        silent = obs.maximum(True).to(lam.device) <= 0
        lam = torch.where(silent, layer.nan_to_num(nan=0.0), lam)
    # A layer that never went above 0 gets a tiny threshold: it still never fires on such inputs.
    lam = lam.clamp_min(MIN_LAM)
    if spec.per_channel:
        lam = lam.reshape(lam_shape(torch.Size((1,) + obs.shape), obs.channels_first))
    return lam.to(torch.float32)


BUILT_IN = frozenset(POLICIES)  # (user policies' outputs are checked: _user_checked)
