"""What ``evaluate`` returns: accuracy at every step, energy, and where accuracy is lost."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class LayerStats:
    """One spiking site: ``lam`` (a float, or per-channel list), ``firing_rate`` (binary spikes per
    neuron per step; ``firing_rates[t-1]`` over steps 1..t), the mean |ANN activation - SNN
    output averaged over T| at that site (None if not measured, or in a result cut to fewer steps),
    and ``synops_cumulative[t-1]``: the accumulates its spikes drive over steps 1..t, per sample (its
    share of ``EvaluationResult.synops_cumulative``, the sum over sites; None where energy was not
    counted)."""

    name: str
    signed: bool
    lam: float | list[float]
    firing_rate: float
    mean_abs_error: float | None
    firing_rates: list[float] = field(default_factory=list)
    synops_cumulative: list[float] | None = None


@dataclass
class EvaluationResult:
    """``snn_accuracy[t-1]``, ``agreement[t-1]`` (percent of samples whose SNN prediction equals the
    ANN's; None without ``ann``), ``energy_ratio[t-1]`` (eq. 31), ``spikes_cumulative[t-1]``
    (binary spikes per sample) and ``synops_cumulative[t-1]`` (the accumulates those spikes drive,
    the SOPs of spiking-network papers, per sample) use steps 1..t of one run. ``macs`` holds the
    multiply-accumulates per sample: ``ann`` (the ANN's, over the same layers), ``static`` (layers
    before the first neuron, once) and ``per_step`` (layers fed changing floats), so that
    ``energy_ratio[t-1] = (E_MAC*(static + t*per_step) + E_AC*synops_cumulative[t-1]) / (E_MAC*ann)``
    and other energy models can be applied to the counts; both None where energy was not counted
    (``energy_ratio`` alone where the ANN has no multiply-accumulates to compare with).
    ``seconds`` is wall-clock time, not a result: ``ann`` (the ANN's forward passes), ``snn`` (the
    simulation) and ``diagnostics`` (their ANN-mode pass, 0 when off); left out of ``to_dict`` and
    of equality, so runs compare by their results."""

    T: int
    samples: int
    ann_accuracy: float | None
    snn_accuracy: list[float]
    energy_ratio: list[float] | None
    spikes_per_sample: float
    agreement: list[float] | None = None
    spikes_cumulative: list[float] = field(default_factory=list)
    per_layer: list[LayerStats] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    synops_cumulative: list[float] | None = None
    macs: dict[str, float] | None = None
    unconverted: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def truncated(self, steps: int) -> "EvaluationResult":
        """The result of the first ``steps`` steps: equal to a run of ``steps`` steps when the
        thresholds do not depend on T (the simulation is causal), the per-layer firing rates and
        synops included; the per-layer errors, measured on the average of all T steps, are None (unless
        ``steps`` is T: the result itself)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"can truncate a {self.T}-step result to 1..{self.T} steps, not {steps}")
        if steps == self.T:
            return replace(self)
        cut = lambda xs: None if xs is None else xs[:steps]  # noqa: E731
        layers = [replace(layer, firing_rate=layer.firing_rates[steps - 1], firing_rates=layer.firing_rates[:steps],
                          synops_cumulative=cut(layer.synops_cumulative), mean_abs_error=None)
                  for layer in self.per_layer]
        return replace(self, T=steps, snn_accuracy=cut(self.snn_accuracy), agreement=cut(self.agreement),
                       energy_ratio=cut(self.energy_ratio), spikes_cumulative=cut(self.spikes_cumulative),
                       synops_cumulative=cut(self.synops_cumulative),
                       spikes_per_sample=self.spikes_cumulative[steps - 1], per_layer=layers)

    def to_dict(self) -> dict:
        """JSON-serializable (plain floats, lists and strings)."""
        d = asdict(self)
        del d["seconds"]
        d["unconverted"] = [list(u) for u in self.unconverted]
        return d
