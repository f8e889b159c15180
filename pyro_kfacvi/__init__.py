"""pyro_kfacvi: natural-gradient variational inference with Kronecker-factored Gaussian
posteriors (Noisy K-FAC and its multi-sample form KFAC-VI) on Pyro."""
from .engine import KFACVI
from .guide import KroneckerGuide
from .likelihoods import Categorical, Gaussian
from .model import BayesianModel
from .predictive import Predictive
from .schedules import WarmupPolynomialLR

__version__ = "0.1.0"
__all__ = ["BayesianModel", "Categorical", "Gaussian", "KFACVI", "KroneckerGuide", "Predictive", "WarmupPolynomialLR"]
