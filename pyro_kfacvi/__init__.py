"""pyro_kfacvi: natural-gradient variational inference with Kronecker-factored Gaussian
posteriors (Noisy K-FAC and its multi-sample form KFAC-VI) on Pyro.

The core: :class:`BayesianModel` (a network as a Pyro model), the guides :class:`KroneckerNormal`
and :class:`KroneckerDelta`, the engine :class:`KFACVI` with its :class:`CurvatureConfig`,
:class:`Predictive`, the schedule of eqs. (13, 14), and :func:`save` and :func:`load`
(:mod:`pyro_kfacvi.io`). The CIFAR-10 application lives in :mod:`pyro_kfacvi.experiments`, which
this package does not import.
"""
from .curvature import CurvatureConfig
from .engine import KFACVI, Retry
from .guides import KroneckerDelta, KroneckerGuide, KroneckerNormal
from .io import load, save
from .likelihoods import Categorical, Gaussian, GaussianPrediction
from .model import BayesianModel
from .predictive import Predictive
from .schedules import WarmupPolynomialLR

__version__ = "0.1.0"
__all__ = ["BayesianModel", "Categorical", "CurvatureConfig", "Gaussian", "GaussianPrediction", "KFACVI", "KroneckerDelta",
           "KroneckerGuide", "KroneckerNormal", "Predictive", "Retry", "WarmupPolynomialLR", "load", "save"]
