"""hmtconv: ANN-to-SNN conversion with Harmony Multi-Threshold neurons.

Paper: Zhang et al., "Generalized Threshold Optimization with Harmony Multi-Threshold Neurons
for Accurate ANN-to-SNN Conversion" (AAAI 2026).

    snn = hmtconv.convert(model, calib_loader, n=4, T=4, policy="opt")
    result = hmtconv.evaluate(snn, loader, ann=model)
"""
__version__ = "0.1.0"

from . import neurons, theory  # noqa: E402
from .allocator import keep_freed_memory  # noqa: E402
from .conversion import (SNN, ConversionConfig, EvaluationResult, HistogramConfig, calibrate,  # noqa: E402
                         convert, evaluate, is_prepared, prepare, register_compensated, register_policy)
from .neurons import HMTNeuron, MTNeuron  # noqa: E402
from .snn_io import load_snn, save_snn  # noqa: E402

__all__ = ["__version__", "HMTNeuron", "MTNeuron", "neurons", "theory", "prepare", "calibrate", "convert",
           "evaluate", "is_prepared", "SNN", "ConversionConfig", "EvaluationResult", "HistogramConfig",
           "register_policy", "register_compensated", "save_snn", "load_snn", "keep_freed_memory"]
