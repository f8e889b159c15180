r"""Curvature in one place, as a back-end in the manner of laplace-torch and curvlinops.

* :mod:`~pyro_kfacvi.curvature.capture`: what a sampled pass records per layer — input second
  moments and output-gradient second moments (K-FAC-expand or K-FAC-reduce);
* :mod:`~pyro_kfacvi.curvature.estimator`: the statistics of eqs. (7, 8) for M weight samples
  (empirical or Monte Carlo Fisher) and their configuration, :class:`CurvatureConfig`;
* :mod:`~pyro_kfacvi.curvature.factors`: the moving averages of eq. (9) per block, their
  eigenbases and damping made exact there.

The engine asks the estimator for statistics; the guide owns the factors of its blocks.
"""
from .capture import KFAC_APPROXIMATIONS, Recorder
from .estimator import FISHER_TYPES, CurvatureConfig, FisherEstimator, Statistics
from .factors import DiagonalFactors, EigendecompositionWarning, KroneckerFactors, symmetric_eigh

__all__ = ["FISHER_TYPES", "KFAC_APPROXIMATIONS", "CurvatureConfig", "DiagonalFactors", "EigendecompositionWarning",
           "FisherEstimator", "KroneckerFactors", "Recorder", "Statistics", "symmetric_eigh"]
