"""ANN -> H-MT SNN conversion and multi-step simulation (prepare -> calibrate -> convert -> evaluate)."""
from .api import calibrate, convert, is_prepared, prepare
from .compensated import register_compensated
from .evaluate import evaluate
from .histograms import HistogramConfig
from .observers import ActivationObserver
from .policies import POLICIES, NeuronSpec, register_policy
from .result import EvaluationResult, LayerStats
from .snn import SNN, ConversionConfig, ConversionReport

__all__ = ["prepare", "calibrate", "convert", "evaluate", "is_prepared", "SNN", "ConversionConfig",
           "ConversionReport", "EvaluationResult", "LayerStats", "ActivationObserver", "HistogramConfig",
           "POLICIES", "NeuronSpec", "register_policy", "register_compensated"]
