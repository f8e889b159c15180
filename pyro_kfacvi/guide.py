"""The Kronecker-factored Gaussian guide q(θ) = Π_layers N(μ_l, Σ_l)."""
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .curvature import DiagonalFactors, KroneckerFactors
from .distributions import EigenbasisNormal, scale_sums_of
from .layers import EigenbasisBlock
from .memo import DerivedValues


@dataclass
class SpectralTerms:
    """What the steps need from the damped spectra of all blocks, in block order: the eigenvalues
    of F̂ + γI arranged like each block (the preconditioner of eq. 10), q's standard deviations in
    the eigenbasis S = ρ/√(eigenvalues) (eq. 12) with their sums (Σ log S, Σ S²), and the part of
    the KL that does not depend on μ, ½[tr Σ/η − D + D log η − log|Σ|] (S = 0 and an infinite
    constant for a point mass)."""

    eigenvalues: list
    scales: list
    scale_sums: list
    kl_constant: torch.Tensor


class PosteriorBlock(nn.Module):
    """q for the parameters of one layer, as one block: the matrix W̃ = [W | b] of a ``Linear``
    or ``Conv2d`` (Kronecker curvature) or the vector [γ, β] of a ``BatchNorm`` (diagonal).

    Holds the curvature F̂ and the mean μ (initialised from the layer's current parameters), the
    latter as its coordinates in the eigenbasis of F̂, ``eigenbasis_loc`` = Q_Gᵀ μ Q_A, where q's
    covariance and the preconditioner are diagonal (:attr:`loc` is μ itself).
    """

    def __init__(self, name, module, adapter, sites, split_damping=False):
        super().__init__()
        self.name = name
        self._layer = (module, adapter)
        self.sites = sites
        params = {p: getattr(module, p).detach() for p in adapter.param_names(module)}
        loc = adapter.join(module, params).clone()
        factors = KroneckerFactors if adapter.kind == "kronecker" else DiagonalFactors
        self.curvature = factors(loc, split_damping)  # its initial eigenbasis is the identity
        self.register_buffer("eigenbasis_loc", loc)

    @property
    def loc(self):
        """μ, shaped like the block."""
        return self.curvature.from_eigenbasis(self.eigenbasis_loc)

    def refresh(self, carried=()):
        """New eigenbases of F̂; the mean and the block tensors ``carried`` (eigenbasis
        coordinates too, e.g. a momentum) are re-expressed in them."""
        self.curvature.refresh((self.eigenbasis_loc, *carried))

    def eigenbasis_params(self, values):
        """Draws in eigenbasis coordinates → what the layer's adapter runs with."""
        module, adapter = self._layer
        if adapter.kind == "kronecker":
            return EigenbasisBlock(values, self.curvature.eigenvectors_G, self.curvature.eigenvectors_A)
        return adapter.split(module, values)

    @property
    def aux_site(self):
        return f"{self.name}.posterior" if self.name else "posterior"

    def split(self, value):
        """Block value(s) ``(..., *block_shape)`` → ``{parameter name: (..., *param_shape)}``."""
        module, adapter = self._layer
        return adapter.split(module, value)


def _forget_gathered(guide, incompatible_keys):
    guide._gathered = None


class KroneckerGuide(nn.Module):
    r"""Pyro guide with a Kronecker-factored Gaussian posterior per layer,

    .. math:: q(\mathrm{vec}\,\tilde W) = N(\mathrm{vec}\,μ,\; ρ^2 (A ⊗ G + γI)^{-1}),

    and a diagonal Gaussian for BatchNorm's scale and shift. Damping is applied exactly in the
    eigenbasis of A and G. Three modes, selected by ``rho``:

    * ``rho=None`` (default): ELBO-exact Noisy K-FAC (Zhang et al. 2018) for the objective
      E_q[log p(D|θ)] − kl_weight·KL(q‖p): ρ² = kl_weight/N, the intrinsic damping kl_weight/(Nη)
      is added to γ, and the prior gradient (kl_weight/(Nη))·μ enters the preconditioned step;
    * ``rho > 0``: the KFAC-VI parametrisation Σ = ρ²(F̂ + γI)⁻¹ with a free temperature ρ;
    * ``rho=0``: a point mass at μ (plain K-FAC).

    Calling the guide samples, per layer, an auxiliary site ``"<layer>.posterior"`` holding the
    whole block and then each weight site of the model as a ``Delta`` on its part of the block
    (the pattern of Pyro's ``AutoMultivariateNormal``).

    :param BayesianModel model: the model whose weight sites this guide covers.
    :param float rho: posterior scale ρ, see above.
    :param float kl_weight: weight of the KL term in the ELBO-exact mode.
    :param float damping: γ, the damping of the curvature (``KFACVI(damping=...)`` sets it too).
    :param bool split_damping: damp the factors, (A + π√γ I) ⊗ (G + √γ/π I), as K-FAC and
        torchsso do, instead of the exact A ⊗ G + γI (default). Σ and the preconditioner stay
        consistent either way (both use the same damped eigenvalues).
    """

    def __init__(self, model, rho=None, kl_weight=1.0, damping=1e-3, split_damping=False):
        super().__init__()
        if rho is not None and not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be None or a finite number >= 0, got {rho}")
        if not kl_weight > 0:
            raise ValueError(f"kl_weight must be positive, got {kl_weight}")
        self._model = (model,)
        self._rho = rho
        self.kl_weight = float(kl_weight)
        self.derived = DerivedValues()
        self.damping = damping
        sites = model.weight_sites()
        blocks = []
        for layer, (module, adapter) in model.layers.items():
            names = {param: site for site, (owner, param, _) in sites.items() if owner == layer}
            if names:
                blocks.append(PosteriorBlock(layer, module, adapter, names, split_damping))
        self.blocks = nn.ModuleList(blocks)
        self._gathered = None  # see _gather
        self.register_load_state_dict_post_hook(_forget_gathered)  # load_state_dict(..., assign=True)

    def _apply(self, fn, recurse=True):
        self._gathered = None  # module.to() and the like replace the tensors gathered
        return super()._apply(fn, recurse)

    def _gather(self):
        """The means (eigenbasis coordinates) and the spectrum buffers of all blocks as two flat lists,
        gathered once: the engine updates them in place and ``load_state_dict`` copies into them; they
        are gathered again after ``guide.to(...)`` (:meth:`_apply`) and ``guide.load_state_dict``, the
        ways to replace them (not by assigning a block's buffers)."""
        if self._gathered is None:
            self._gathered = ([block.eigenbasis_loc for block in self.blocks],
                              [t for block in self.blocks for t in block.curvature.spectrum_buffers()])
        return self._gathered

    def means(self):
        """μ of every block in eigenbasis coordinates: the buffers themselves."""
        return self._gather()[0]

    @property
    def model(self):
        return self._model[0]

    @property
    def damping(self):
        return self._damping

    @damping.setter
    def damping(self, value):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"damping must be a finite number >= 0, got {value}")
        self._damping = float(value)

    @property
    def elbo_exact(self):
        return self._rho is None

    @property
    def prior_precision(self):
        """kl_weight/(Nη) in the ELBO-exact mode (the per-datum prior precision), else 0."""
        if not self.elbo_exact:
            return 0.0
        return self.kl_weight / (self.model.num_data * self.model.prior_variance)

    @property
    def rho(self):
        return math.sqrt(self.kl_weight / self.model.num_data) if self.elbo_exact else self._rho

    @property
    def is_point_mass(self):
        return self.rho == 0

    @property
    def posterior_damping(self):
        """γ plus the intrinsic damping kl_weight/(Nη) of the ELBO-exact mode."""
        return self.damping + self.prior_precision

    def distributions(self):
        """The per-block distributions, in block order: N(μ, ρ²(F̂ + γI)⁻¹) (eq. 12), or point masses
        at μ when ρ = 0."""
        if self.is_point_mass:
            return [dist.Delta(block.loc, event_dim=block.loc.dim()) for block in self.blocks]
        terms = self.spectral_terms()
        return [EigenbasisNormal(block.loc, scale, block.curvature, sums)
                for block, scale, sums in zip(self.blocks, terms.scales, terms.scale_sums)]

    def spectral_terms(self):
        """The :class:`SpectralTerms` for γ = :attr:`posterior_damping`, ρ and η, kept until the spectrum
        of any block changes (a refresh, ``load_state_dict``) or one of the numbers does — one check for
        all blocks (:mod:`pyro_kfacvi.memo`)."""
        rho, damping, eta = self.rho, self.posterior_damping, self.model.prior_variance
        return self.derived.get("spectral terms", self._gather()[1], (rho, damping, eta),
                                lambda: self.compute_spectral_terms(rho, damping, eta))

    def compute_spectral_terms(self, rho, damping, eta):
        """:class:`SpectralTerms` from the current spectra, without the memo."""
        eigenvalues = [block.curvature.eigenvalues(damping) for block in self.blocks]
        scales = [rho * e.rsqrt() for e in eigenvalues]
        sums = [scale_sums_of(scale) for scale in scales]
        d = sum(scale.numel() for scale in scales)
        trace, log_det = sum(variances for _, variances in sums), sum(2 * logs for logs, _ in sums)
        return SpectralTerms(eigenvalues, scales, sums, 0.5 * (trace / eta - d + d * math.log(eta) - log_det))

    def damped_eigenvalues(self):
        """Per block, the eigenvalues of F̂ + γI arranged like the block (γ = :attr:`posterior_damping`)."""
        return self.spectral_terms().eigenvalues

    def scales(self):
        """Per block, S = ρ/√(eigenvalues of F̂ + γI), q's standard deviations in the eigenbasis
        (eq. 12), with its sums (Σ log S, Σ S²)."""
        terms = self.spectral_terms()
        return list(zip(terms.scales, terms.scale_sums))

    def forward(self, *args, **kwargs):
        samples = {}
        for block, q in zip(self.blocks, self.distributions()):
            value = pyro.sample(block.aux_site, q, infer={"is_auxiliary": True})
            for param, part in block.split(value).items():
                event_dim = part.dim() - value.dim() + block.loc.dim()
                samples[block.sites[param]] = pyro.sample(block.sites[param], dist.Delta(part, event_dim=event_dim))
        return samples

    def sample_blocks(self, num_samples):
        """M draws of every block as weights, each of shape ``(M, *block_shape)``: those of
        :meth:`sample_eigenbasis_blocks`, with one change of basis each."""
        return [block.curvature.from_eigenbasis(values)
                for block, values in zip(self.blocks, self.sample_eigenbasis_blocks(num_samples))]

    def layer_params(self, block_samples):
        """Block samples → ``{layer name: {parameter name: (M, *param_shape)}}`` for the network."""
        return {block.name: block.split(value) for block, value in zip(self.blocks, block_samples)}

    def sample_eigenbasis_blocks(self, num_samples):
        """M draws of every block in its eigenbasis coordinates (see :class:`PosteriorBlock`),
        ``(M, *block_shape)`` each: elementwise, the basis change is left to the layers."""
        means = self.means()
        if self.is_point_mass:
            return [mean.expand(num_samples, *mean.shape) for mean in means]
        sizes = [num_samples * mean.numel() for mean in means]
        noise = torch.randn(sum(sizes), dtype=means[0].dtype, device=means[0].device).split(sizes)
        return self.eigenbasis_draws([part.view(num_samples, *mean.shape) for part, mean in zip(noise, means)])

    def eigenbasis_draws(self, noises):
        """Q_Gᵀ μ Q_A + ε ⊙ S per block (eq. 12 in eigenbasis coordinates), for standard normal
        ``noises`` ε, one ``(M, *block_shape)`` per block."""
        return torch._foreach_addcmul(self.means(), noises, self.spectral_terms().scales)

    def eigenbasis_layer_params(self, block_values):
        """Draws in eigenbasis coordinates → ``{layer name: params}`` for the network (Kronecker
        blocks as :class:`~pyro_kfacvi.layers.EigenbasisBlock`)."""
        return {block.name: block.eigenbasis_params(value) for block, value in zip(self.blocks, block_values)}

    def log_q(self, block_samples):
        """log q of each draw, shape ``(M,)``."""
        return sum(q.log_prob(value) for q, value in zip(self.distributions(), block_samples))

    def mean_squared_norm(self):
        """‖μ‖² over all blocks, one fused reduction (in eigenbasis coordinates: the bases are orthogonal)."""
        norms = torch.stack(torch._foreach_norm(self.means()))
        return torch.dot(norms, norms)

    def kl_to_prior(self):
        """KL(q ‖ N(0, ηI)) = ½[(tr Σ + ‖μ‖²)/η − D + D log η − log|Σ|] over all D parameters
        (infinite for a point mass). The terms in Σ change only with the eigenbases and are kept
        until then (:meth:`spectral_terms`)."""
        if self.is_point_mass:
            return torch.tensor(math.inf, device=self.blocks[0].eigenbasis_loc.device)
        eta = self.model.prior_variance
        return torch.add(self.spectral_terms().kl_constant, self.mean_squared_norm(), alpha=0.5 / eta)

    def log_prior_of_mean(self):
        """log N(μ; 0, ηI) = −½‖μ‖²/η − ½D log(2πη), the prior term of the MAP objective (used when
        ρ = 0); isotropic, so the same in eigenbasis coordinates."""
        eta, d = self.model.prior_variance, sum(mean.numel() for mean in self.means())
        return self.mean_squared_norm() * (-0.5 / eta) - 0.5 * d * math.log(2 * math.pi * eta)

    @torch.no_grad()
    def mean_network(self):
        """Copy μ into the wrapped network's parameters (a point estimate for plain PyTorch use)."""
        for block in self.blocks:
            module, _ = block._layer
            for param, value in block.split(block.loc).items():
                getattr(module, param).copy_(value)
        return self.model.net
