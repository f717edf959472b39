"""The converted network: a graph (or module-swapped model) plus its conversion config as plain data."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from ..device import KeepsDtype, placement
from ..errors import whole_number
from .compensated import Compensated
from .memory import MARGIN, leaf_output_bytes
from .multistep import TimeAware, unfold
from .policies import parse_policy
from .sites import SpikingActivation

NEURONS = ("hmt", "if", "mt")
IDENTITIES = ("none", "maxpool", "all", "linear")
GRANULARITIES = ("layer", "channel")


@dataclass
class ConversionConfig:
    """Everything ``convert`` was asked for; plain data (saved with the SNN, read by the CLI)."""

    n: int = 4
    T: int = 4
    policy: str | float = "opt"
    neuron: str = "hmt"
    identity: str = "none"
    communicate: bool = True
    granularity: str = "layer"

    def __post_init__(self):
        for name, allowed in (("neuron", NEURONS), ("identity", IDENTITIES), ("granularity", GRANULARITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.n, self.T = whole_number(self.n, "n"), whole_number(self.T, "T")
        parse_policy(self.policy)  # a typo in a policy or its per-site overrides fails here
        if not isinstance(self.communicate, bool):  # ("no" would be true)
            raise TypeError(f"communicate must be True or False, got {self.communicate!r}")
        if self.neuron == "if":
            self.n = 1  # the classic IF neuron is the one-threshold H-MT

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConversionReport:
    """What conversion found: the input shape it was calibrated on, whether fx traced the model,
    why not, activations left in float (module qualified name, op) when it did not, and the
    BatchNorm modules folded into the convolution before them."""

    input_shape: tuple[int, ...]
    traced: bool = True
    unconverted: list[tuple[str, str]] = field(default_factory=list)
    trace_error: str | None = None
    folded_batchnorm: list[str] = field(default_factory=list)


def check_steps(steps) -> int:
    """``steps`` as an int if it is a positive integer (not a bool or float); else a ValueError."""
    return whole_number(steps, "T (time steps)")


class SNN(KeepsDtype):
    """``forward(x, T)`` returns the per-step outputs ``[T, B, ...]`` (the image enters as the same
    analog value at every step). Energy counts (per sample, see energy.py) are float64 buffers, kept
    so when the SNN is cast (``.half()``)."""

    KEEP_DTYPE = ("mac_ann", "mac_static", "mac_step", "memory_profile")

    def __init__(self, net: nn.Module, config: ConversionConfig, report: ConversionReport,
                 output_temporal: bool, macs: dict[str, float] | None,
                 memory_profile: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.config = config
        self.report = report
        self.output_temporal = output_temporal
        device = placement(net)[0]
        for key in ("mac_ann", "mac_static", "mac_step"):  # None when energy could not be counted
            value = None if macs is None else torch.tensor(macs[key], dtype=torch.float64, device=device)
            self.register_buffer(key, value)
        # (static, per-step) live activation bytes per graph node for one sample (memory.py);
        # recomputed whenever the SNN is built, so not saved with it.
        self.register_buffer("memory_profile", memory_profile, persistent=False)
        # the profile counts bytes of the dtype it was traced in; a cast SNN (.double(), .half())
        # scales it by its own element size
        self._profile_dtype = placement(net)[1]
        self._leaf_bytes: dict[tuple[torch.device, torch.dtype], float] = {}  # by placement: a cast changes it
        self._time_aware = [m for m in net.modules() if isinstance(m, TimeAware)]

    def activation_bytes(self, steps: int | None = None) -> float:
        """Estimated peak activation memory of one sample simulated for ``steps`` steps (memory.py)."""
        steps = self.config.T if steps is None else steps
        where = placement(self.net)
        if self.memory_profile is not None:
            scale = where[1].itemsize / self._profile_dtype.itemsize
            return scale * MARGIN * (self.memory_profile[:, 0] + steps * self.memory_profile[:, 1]).max().item()
        if where not in self._leaf_bytes:  # module-swapped model: every op sees T*B rows
            self._set_steps(1)
            self._leaf_bytes[where] = leaf_output_bytes(self.net, self.report.input_shape, *where)
        return MARGIN * steps * self._leaf_bytes[where]

    def sites(self) -> dict[str, SpikingActivation]:
        """Spiking neurons by qualified name (as in the prepared model), in the order the traced
        graph runs them (a module-swapped model: the order of its modules)."""
        found = {name: m for name, m in self.net.named_modules() if isinstance(m, SpikingActivation)}
        if isinstance(self.net, fx.GraphModule):
            ran = [n.target for n in self.net.graph.nodes if n.op == "call_module" and n.target in found]
            found = {name: found[name] for name in dict.fromkeys(ran + list(found))}
        return found

    @contextlib.contextmanager
    def per_step_values(self):
        """Inside, every neuron outputs its spikes of each step (``[T*B, ...]`` per-step values)
        and every compensated op its per-step differences: none exchanges running means
        (build.py), so forward hooks on the sites see spike trains everywhere. Results are equal
        bit for bit, a little slower."""
        neurons = [site.neuron for site in self.sites().values()]
        ops = [m for m in self.net.modules() if isinstance(m, Compensated)]
        saved = [(n.takes_means, n.gives_means) for n in neurons], [(m.emits_means, m.means_given) for m in ops]
        for n in neurons:
            n.takes_means = n.gives_means = False
        for m in ops:
            m.emits_means, m.means_given = False, ()
        try:
            yield self
        finally:
            for n, (takes, gives) in zip(neurons, saved[0]):
                n.takes_means, n.gives_means = takes, gives
            for m, (emits, given) in zip(ops, saved[1]):
                m.emits_means, m.means_given = emits, given

    def _set_steps(self, steps: int) -> None:
        for m in self._time_aware:
            if m.steps != steps:  # (a module's attribute write costs microseconds; most runs keep T)
                m.steps = steps

    @torch.no_grad()
    def forward(self, x: torch.Tensor, T: int | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.report.input_shape):  # (synapse counts are per position)
            fix = ("add the batch dim (x[None] for one image)" if tuple(x.shape) == tuple(self.report.input_shape)
                   else "convert again for this size")
            raise ValueError(f"images of shape {list(x.shape[1:])} (a batch of shape {list(x.shape)}), but the SNN "
                             f"was calibrated on {list(self.report.input_shape)}; {fix}")
        steps = self.config.T if T is None else check_steps(T)  # (0 failed deep inside: division by zero)
        self._set_steps(steps)
        if not self.report.traced:  # module-swapped model: no static prefix, every op sees T*B rows
            x = x.repeat(steps, *[1] * (x.dim() - 1))  # (a copy: an in-place first op writes over it)
        y = self.net(x)
        return unfold(y, steps) if self.output_temporal else y.unsqueeze(0).expand(steps, *y.shape)

    @torch.no_grad()
    def ann_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ANN this SNN was converted from (neurons back to ReLU / identity, one step)."""
        self._set_steps(1)
        sites = self.sites().values()
        for m in sites:
            m.ann_mode = True
        try:
            return self.net(x)
        finally:
            for m in sites:
                m.ann_mode = False
