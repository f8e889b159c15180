"""The guide's per-block distribution: a Gaussian whose covariance is diagonal in an orthogonal
(Kronecker or identity) eigenbasis."""
import math

import torch
from pyro.distributions import TorchDistribution, constraints


def scale_sums_of(scale):
    """(Σ log S, Σ S²) of the scale grid S."""
    return scale.log().sum(), scale.pow(2).sum()


class EigenbasisNormal(TorchDistribution):
    r"""q(w) = N(loc, U diag(scale²) Uᵀ) for a block ``w`` shaped like ``loc``.

    ``basis`` is a curvature back-end (:mod:`pyro_kfacvi.curvature`) that supplies the orthogonal
    map U (``from_eigenbasis``) and Uᵀ (``to_eigenbasis``). For Kronecker factors, with
    ε ~ N(0, I) of shape ``(d_out, d_in)``:

    .. math:: W = μ + Q_G (ε ⊙ S) Q_Aᵀ,   S_{ij} = ρ / \sqrt{e_{G,i} e_{A,j} + γ},

    which has covariance ρ²(A ⊗ G + γI)⁻¹ (eq. 12) — note L_G ε L_Aᵀ, not an upper factor on the left.
    The event shape is ``loc.shape``; the batch shape is empty. ``scale_sums`` = (Σ log S, Σ S²),
    which the log-density, entropy and KL need, may be passed precomputed (they change only when
    the eigenbasis does).
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc, scale, basis, scale_sums=None, validate_args=None):
        self.loc, self.scale, self.basis = loc, scale, basis
        self.log_scale_sum, self.variance_sum = scale_sums if scale_sums is not None else scale_sums_of(scale)
        super().__init__(torch.Size(), loc.shape, validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, self.loc.dim())

    def rsample(self, sample_shape=torch.Size()):
        noise = torch.randn(*sample_shape, *self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.reparameterize(noise)

    def reparameterize(self, noise):
        """w = loc + U(ε ⊙ scale) for standard normal noise ε of shape ``(..., *loc.shape)``."""
        return self.loc + self.basis.from_eigenbasis(noise * self.scale)

    def log_prob(self, value):
        z = self.basis.to_eigenbasis(value - self.loc) / self.scale
        event_dims = tuple(range(-self.loc.dim(), 0))
        return -0.5 * z.pow(2).sum(event_dims) - self.log_scale_sum - 0.5 * self.loc.numel() * math.log(2 * math.pi)

    def entropy(self):
        return self.log_scale_sum + 0.5 * self.loc.numel() * (1 + math.log(2 * math.pi))

    @property
    def mean(self):
        return self.loc
