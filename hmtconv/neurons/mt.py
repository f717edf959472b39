"""Prior-work multi-threshold neuron: one threshold cut into n equal segments (Lv et al. 2024).

Baseline for Appendix A of the paper: its per-step output tops out at ``theta`` (n levels of
``theta/n``), so an input the H-MT neuron with the same largest threshold still follows
(up to ``(2 - 2**(1-n)) * theta`` per step) makes its membrane grow without bound.
"""
from __future__ import annotations

import torch

from .multilevel import MultiLevelNeuron, as_threshold, check_n


class MTNeuron(MultiLevelNeuron):
    """Output ``j * theta/n`` for the largest ``j <= n`` with ``m >= j * theta/n``, reset by subtraction.

    The membrane starts at half a segment, ``theta/(2n)``, as the IF neuron's starts at half its
    threshold. A level ``j`` counts as ``j`` binary spikes (the group of ``n`` sub-neurons of
    Lv et al. in which ``j`` fire), so energy compares fairly with H-MT's popcount.
    """

    def __init__(self, n: int, theta, signed: bool = False):
        check_n(n)
        self.n = n
        step = as_threshold(theta, "theta") / n
        super().__init__(step, signed, communicate=False, levels=n,
                         spike_lut=torch.arange(n + 1, dtype=torch.float32))

    @property
    def theta(self) -> torch.Tensor:
        return self.lam * self.n

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()
