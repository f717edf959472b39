"""Harmony Multi-Threshold neuron (Section 4.1, eqs. 12-21)."""
from __future__ import annotations

import torch

from .multilevel import MultiLevelNeuron, check_n


def popcount_table(n: int) -> torch.Tensor:
    """Binary spikes of level k: the thresholds lam * 2**j that fire are the set bits of k."""
    k = torch.arange(2**n, dtype=torch.int64)
    bits = (k.unsqueeze(1) >> torch.arange(n)) & 1
    return bits.sum(1).to(torch.float32)


class HMTNeuron(MultiLevelNeuron):
    """H-MT neuron with thresholds ``lam * 2**(n-1), ..., 2*lam, lam`` (eq. 12).

    ``signed=False`` is the Basal (Pos) neuron that replaces ReLU (eqs. 13-18); ``signed=True``
    is the Pos/Neg pair that simulates y = x, with the communication of eq. 21 when
    ``communicate=True``. ``n = 1`` is the classic IF neuron with ``v[0] = theta/2``.
    One step in closed form: ``k = clamp(floor((v + I)/lam), 0, 2**n - 1)``, output ``k*lam``,
    ``popcount(k)`` spikes.
    """

    def __init__(self, n: int, lam, signed: bool = False, communicate: bool = True):
        self.n = check_n(n)
        super().__init__(lam, signed, communicate, levels=2**n - 1, spike_lut=popcount_table(n))

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()
