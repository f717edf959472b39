"""Spiking neurons: H-MT (the paper's) and the prior-work equal-segment MT baseline."""
from .hmt import HMTNeuron
from .mt import MTNeuron
from .multilevel import MultiLevelNeuron

__all__ = ["HMTNeuron", "MTNeuron", "MultiLevelNeuron"]
