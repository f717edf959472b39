"""What ``evaluate`` returns: accuracy at every step, energy, and where accuracy is lost."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """One spiking site: ``lam`` (a float, or per-channel list), binary spikes per neuron per step,
    and the mean |ANN activation - SNN output averaged over T| at that site (None if not measured)."""

    name: str
    signed: bool
    lam: float | list[float]
    firing_rate: float
    mean_abs_error: float | None


@dataclass
class EvaluationResult:
    """``snn_accuracy[t-1]`` and ``energy_ratio[t-1]`` use steps 1..t of one run (percent; eq. 31)."""

    T: int
    samples: int
    ann_accuracy: float | None
    snn_accuracy: list[float]
    energy_ratio: list[float] | None
    spikes_per_sample: float
    per_layer: list[LayerStats] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    unconverted: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serializable (plain floats, lists and strings)."""
        d = asdict(self)
        d["unconverted"] = [list(u) for u in self.unconverted]
        return d
