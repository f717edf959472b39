"""hmtconv: ANN-to-SNN conversion with Harmony Multi-Threshold neurons.

Paper: Zhang et al., "Generalized Threshold Optimization with Harmony Multi-Threshold Neurons
for Accurate ANN-to-SNN Conversion" (AAAI 2026).
"""
from . import neurons, theory
from .neurons import HMTNeuron, MTNeuron

__version__ = "0.1.0"

__all__ = ["HMTNeuron", "MTNeuron", "neurons", "theory", "__version__"]
