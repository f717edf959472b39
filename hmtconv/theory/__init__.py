"""Threshold theory (Section 4.2): expected error of eqs. 9/23, k factor of eq. 29, optimal lam."""
from .error import k_factor, quantization_error
from .solve import fixed_point_lam, optimal_lam

__all__ = ["quantization_error", "k_factor", "optimal_lam", "fixed_point_lam"]
