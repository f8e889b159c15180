r"""Kronecker-factored guides: posterior families over the weights of a
:class:`~pyro_kfacvi.BayesianModel`, one block per layer, as Pyro's autoguides are classes.

* :class:`KroneckerDelta`: a point mass at μ — plain K-FAC (a MAP estimate), like ``AutoDelta``;
* :class:`KroneckerNormal`: q(vec W̃) = N(vec μ, Σ) per layer with Σ diagonal in the eigenbasis of
  the layer's curvature F̂ ≈ A ⊗ G — Noisy K-FAC (ELBO-exact, the default) or the paper's KFAC-VI
  with a fixed ρ.

Both hold, per block, the curvature F̂ (:mod:`pyro_kfacvi.curvature.factors`) and the mean μ in
the eigenbasis of F̂, and the extrinsic damping γ of the preconditioner (eq. 10), with its
split-damping choice. The natural-gradient engine (:class:`~pyro_kfacvi.KFACVI`) calls the
methods of :class:`KroneckerGuide` and never asks which family it drives.

A guide's :meth:`~torch.nn.Module.state_dict` carries its family and configuration (and γ, which
the engine's retries may have grown); loading it into a guide of another family, shape or
configuration raises :class:`GuideStateError`.
"""
import math
import warnings
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn

from .curvature.factors import DiagonalFactors, KroneckerFactors
from .distributions import EigenbasisNormal, scale_sums_of
from .layers import EigenbasisBlock
from .memo import DerivedValues


class GuideStateError(ValueError):
    """A saved guide state does not fit this guide (another family, shape or configuration)."""


class PosteriorBlock(nn.Module):
    """One layer's parameters as one block: the matrix W̃ = [W | b] of a ``Linear`` or ``Conv2d``
    (Kronecker curvature) or the vector [γ, β] of a ``BatchNorm`` (diagonal).

    Holds the curvature F̂ and the mean μ (initialised from the layer's current parameters), the
    latter as its coordinates in the eigenbasis of F̂, ``eigenbasis_loc`` = Q_Gᵀ μ Q_A, where q's
    covariance and the preconditioner are diagonal (:attr:`loc` is μ itself). ``bayesian``: whether
    the model chose this layer's posterior to be a distribution (``BayesianModel(bayesian=...)``).
    """

    def __init__(self, name, module, adapter, sites, bayesian=True):
        super().__init__()
        self.name = name
        self.bayesian = bayesian
        self._layer = (module, adapter)
        self.sites = sites
        params = {p: getattr(module, p).detach() for p in adapter.param_names(module)}
        loc = adapter.join(module, params).clone()
        factors = KroneckerFactors if adapter.kind == "kronecker" else DiagonalFactors
        self.curvature = factors(loc, name)  # its initial eigenbasis is the identity
        self.register_buffer("eigenbasis_loc", loc)

    @property
    def loc(self):
        """μ, shaped like the block."""
        return self.curvature.from_eigenbasis(self.eigenbasis_loc)

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


@dataclass
class SpectralTerms:
    """What q needs from the spectra of all blocks, in block order: its standard deviations in the
    eigenbasis S = ρ/√(eigenvalues of Σ⁻¹/ρ²) (eq. 12) with their sums (Σ log S, Σ S²), and the part
    of the KL that does not depend on μ, ½[tr Σ/η − D + D log η − log|Σ|]."""

    scales: list
    scale_sums: list
    kl_constant: torch.Tensor


def _forget_gathered(guide, incompatible_keys):
    guide._gathered = None


class KroneckerGuide(nn.Module):
    r"""Base of the Kronecker-factored guides (module doc): the blocks, their curvature and means,
    the preconditioner's damping, and the Pyro guide call.

    Calling the guide samples, per layer, an auxiliary site ``"<layer>.posterior"`` holding the
    whole block and then each weight site of the model as a ``Delta`` on its part of the block
    (the pattern of Pyro's ``AutoMultivariateNormal``).

    :param BayesianModel model: the model whose weight sites this guide covers.
    :param float damping: γ, the extrinsic damping of the preconditioner (F̂ + γI)⁻¹ of eq. (10);
        default 1e-2 (docs/robustness.md, "Defaults").
    :param bool split_damping: damp the factors, (A + π√γ I) ⊗ (G + √γ/π I), as K-FAC and
        torchsso do, instead of the exact A ⊗ G + γI (default).
    """

    def __init__(self, model, damping=1e-2, split_damping=False):
        super().__init__()
        self._model = (model,)
        self.derived = DerivedValues()
        self.damping = damping
        self.split_damping = bool(split_damping)
        sites = model.weight_sites()
        blocks = []
        for layer, (module, adapter) in model.layers.items():
            names = {param: site for site, (owner, param, _) in sites.items() if owner == layer}
            if names:
                blocks.append(PosteriorBlock(layer, module, adapter, names, model.is_bayesian(layer)))
        self.blocks = nn.ModuleList(blocks)
        self._gathered = None  # see _gather
        self.register_load_state_dict_post_hook(_forget_gathered)  # load_state_dict(..., assign=True)

    # ---------------------------------------------------------------- configuration and state
    @property
    def model(self):
        return self._model[0]

    @property
    def damping(self):
        """γ, the extrinsic damping of the preconditioner (the engine's retries may grow it)."""
        return self._damping

    @damping.setter
    def damping(self, value):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"damping must be a finite number >= 0, got {value}")
        self._damping = float(value)

    def config(self):
        """The family's configuration: what a saved state must agree with to be loaded."""
        return {"split_damping": self.split_damping}

    def block_description(self):
        """Per block: its name, shape and whether its posterior is a distribution (the model's choice)."""
        return [[block.name, list(block.eigenbasis_loc.shape), block.bayesian] for block in self.blocks]

    def get_extra_state(self):
        return {"family": type(self).__name__, "config": self.config(), "blocks": self.block_description(),
                "damping": self.damping}

    def set_extra_state(self, state):
        """Check that ``state`` (of :meth:`get_extra_state`) fits this guide, then take its γ."""
        if not isinstance(state, dict) or "family" not in state:
            raise GuideStateError("the state has no guide family: it was not saved by this version's guides")
        if state["family"] != type(self).__name__:
            raise GuideStateError(f"the state belongs to a {state['family']}, this guide is a {type(self).__name__}")
        blocks = self.block_description()
        if state["blocks"] != blocks:
            raise GuideStateError(f"the state's blocks (name, shape, Bayesian) {state['blocks']} differ from this "
                                  f"guide's {blocks}")
        if state["config"] != self.config():
            raise GuideStateError(f"the state was saved with {state['config']}, this guide has {self.config()}")
        self.damping = state["damping"]

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

    # ---------------------------------------------------------------- the preconditioner (eq. 10)
    @property
    def prior_precision(self):
        """π, the per-datum precision of the prior term that the update preconditions along with ḡ,
        (F̂ + γI)⁻¹(ḡ + πμ): 0 unless the family's objective puts the prior's gradient there."""
        return 0.0

    @property
    def preconditioner_damping(self):
        """γ + π: the damping of the preconditioner."""
        return self.damping + self.prior_precision

    def damped_eigenvalues(self, damping):
        """Per block, the eigenvalues of F̂ + ``damping``·I arranged like the block, split or exact."""
        if self.split_damping:
            return [block.curvature.split_eigenvalues(damping) for block in self.blocks]
        return [block.curvature.eigenvalues(damping) for block in self.blocks]

    def preconditioner(self):
        """Per block, the eigenvalues of F̂ + (γ + π)I that eq. (10) divides by, kept until a spectrum
        or γ changes (:mod:`pyro_kfacvi.memo`)."""
        damping = self.preconditioner_damping
        return self.derived.get("preconditioner", self._gather()[1], (damping, self.split_damping),
                                lambda: self.damped_eigenvalues(damping))

    # ---------------------------------------------------------------- curvature updates (eqs. 9, 12)
    def curvature_update(self, factors, beta, refresh, track_eigenvalues=False):
        """Eq. (9) for every block with F̄ = ``factors`` (``None``: keep F̂) and, if ``refresh``, new
        eigendecompositions, else, if ``track_eigenvalues`` and F̂ changed, its eigenvalues in the
        kept eigenbases (``CurvatureConfig``) — computed without changing anything (a failure here
        leaves the guide as it was). Returns the update for :meth:`commit_curvature`."""
        averaged = [block.curvature.factors() if factors is None else block.curvature.averaged(f, beta)
                    for block, f in zip(self.blocks, factors or [None] * len(self.blocks))]
        if refresh:
            spectra = [block.curvature.decompose(f) for block, f in zip(self.blocks, averaged)]
        elif track_eigenvalues and factors is not None:
            spectra = [block.curvature.rayleigh_quotients(f) for block, f in zip(self.blocks, averaged)]
        else:
            spectra = [None] * len(self.blocks)
        return averaged, spectra

    def commit_curvature(self, update, carried=None):
        """Store an update of :meth:`curvature_update`; with new eigenbases, the means and the block
        tensors ``carried`` (one tuple per block of eigenbasis coordinates, e.g. a momentum) are
        re-expressed in them."""
        carried = carried or [()] * len(self.blocks)
        for block, averaged, spectrum, extra in zip(self.blocks, *update, carried):
            block.curvature.commit(averaged, spectrum, (block.eigenbasis_loc, *extra))

    # ---------------------------------------------------------------- drawing weights
    def distinct_draws(self, num_samples):
        """How many of ``num_samples`` draws from q differ."""
        return num_samples

    def sample_eigenbasis_blocks(self, num_samples, noise=None):
        """M draws of every block in its eigenbasis coordinates (see :class:`PosteriorBlock`),
        ``(M, *block_shape)`` each. ``noise(shapes)``, if given, returns the standard normal noise,
        one ``(M, *block_shape)`` tensor per block (default: from the global RNG)."""
        raise NotImplementedError

    def sample_blocks(self, num_samples):
        """M draws of every block as weights, each of shape ``(M, *block_shape)``."""
        return [block.curvature.from_eigenbasis(values)
                for block, values in zip(self.blocks, self.sample_eigenbasis_blocks(num_samples))]

    def layer_params(self, block_samples):
        """Block samples → ``{layer name: {parameter name: (M, *param_shape)}}`` for the network."""
        return {block.name: block.split(value) for block, value in zip(self.blocks, block_samples)}

    def eigenbasis_layer_params(self, block_values):
        """Draws in eigenbasis coordinates → ``{layer name: params}`` for the network (Kronecker
        blocks as :class:`~pyro_kfacvi.layers.EigenbasisBlock`)."""
        return {block.name: block.eigenbasis_params(value) for block, value in zip(self.blocks, block_values)}

    def distributions(self):
        """The per-block distributions q, in block order."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        self._warn_under_svi()
        samples = {}
        for block, q in zip(self.blocks, self.distributions()):
            value = pyro.sample(block.aux_site, q, infer={"is_auxiliary": True})
            for param, part in block.split(value).items():
                event_dim = part.dim() - value.dim() + block.loc.dim()
                samples[block.sites[param]] = pyro.sample(block.sites[param], dist.Delta(part, event_dim=event_dim))
        return samples

    _warned_under_svi = False

    def _warn_under_svi(self):
        """Warn once if ``pyro.infer.SVI`` runs this guide: its step records the Pyro parameters of
        model and guide (a ``poutine.trace(param_only=True)`` around the loss) to hand them to its
        optimiser, and this guide has none, so SVI would train nothing. Other traces (``poutine.trace``,
        ``pyro.infer.Predictive``, ``Trace_ELBO().loss``) do not warn."""
        if not self._warned_under_svi and any(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK):
            self._warned_under_svi = True
            warnings.warn(f"pyro.infer.SVI trains nothing with a {type(self).__name__}: the guide has no Pyro "
                          "parameters (μ and the curvature are updated by natural gradients, not by a Pyro optimiser). "
                          "Train it with pyro_kfacvi.KFACVI(model, guide, lr=...).step(x, y).", UserWarning)

    def log_q(self, block_samples):
        """log q of each draw, shape ``(M,)``."""
        return sum(q.log_prob(value) for q, value in zip(self.distributions(), block_samples))

    # ---------------------------------------------------------------- the objective
    def complexity(self):
        """The complexity term of the per-datum objective (negative ELBO or negative log joint)."""
        raise NotImplementedError

    def mean_squared_norm(self):
        """‖μ‖² over all blocks, one fused reduction (in eigenbasis coordinates: the bases are orthogonal)."""
        norms = torch.stack(torch._foreach_norm(self.means()))
        return torch.dot(norms, norms)

    def covariance_trace(self):
        """tr Σ over all blocks."""
        raise NotImplementedError

    def second_moment(self):
        """E_q‖θ‖² = ‖μ‖² + tr Σ over all blocks: what the empirical-Bayes prior variance
        (``BayesianModel(..., prior_variance="auto")``) divides by the number of weights."""
        return self.mean_squared_norm() + self.covariance_trace()

    def log_prior_of_mean(self):
        """log N(μ; 0, ηI) = −½‖μ‖²/η − ½D log(2πη); isotropic, so the same in eigenbasis coordinates."""
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


class KroneckerDelta(KroneckerGuide):
    r"""A point mass at μ per layer — plain K-FAC, the MAP estimate of the model's weights.

    Its objective per datum is −(1/N) log p(D | μ) − (1/N) log p(μ) (:meth:`complexity` is the
    second term); the update (10) uses the engine's weight decay λ in place of the prior's gradient
    (:attr:`prior_precision` is 0), as the paper's K-FAC does.
    """

    def distinct_draws(self, num_samples):
        """1: every draw is μ."""
        return 1

    def sample_eigenbasis_blocks(self, num_samples, noise=None):
        """μ, expanded to M identical draws (no noise is drawn)."""
        return [mean.expand(num_samples, *mean.shape) for mean in self.means()]

    def distributions(self):
        return [dist.Delta(block.loc, event_dim=block.loc.dim()) for block in self.blocks]

    def covariance_trace(self):
        """0: a point mass."""
        return 0.0

    def complexity(self):
        """−log p(μ)/N."""
        return -self.log_prior_of_mean() / self.model.num_data


class KroneckerNormal(KroneckerGuide):
    r"""A Gaussian per layer, diagonal in the eigenbasis of its curvature F̂ ≈ A ⊗ G,

    .. math:: q(\mathrm{vec}\,\tilde W) = N(\mathrm{vec}\,μ,\; Σ),

    with a diagonal Gaussian for BatchNorm's scale and shift. Two scales:

    * ``rho=None`` (default): ELBO-exact Noisy K-FAC (Zhang et al. 2018) for the objective
      E_q[log p(D|θ)] − κ·KL(q‖p), κ = ``kl_weight``: Σ = (κ/N)(F̂ + πI)⁻¹ with the intrinsic damping
      π = κ/(Nη) alone, the fixed point of the ELBO's natural gradient (eqs. 3, 4); the prior's
      gradient πμ enters the preconditioned step, and γ acts only in the preconditioner
      (F̂ + (γ + π)I)⁻¹;
    * ``rho=ρ > 0``: the paper's KFAC-VI, eq. (12), Σ = ρ²(F̂ + γI)⁻¹ with the preconditioner's
      damped eigenvalues (split or exact) and a free temperature ρ; the prior acts through the
      engine's weight decay λ.

    :param BayesianModel model: the model whose weight sites this guide covers.
    :param float rho: ``None`` (ELBO-exact) or ρ > 0, see above.
    :param float kl_weight: κ, the weight of the KL term (ELBO-exact: ρ² = κ/N).
    :param float damping: γ, see :class:`KroneckerGuide`.
    :param bool split_damping: see :class:`KroneckerGuide`.
    """

    def __init__(self, model, rho=None, kl_weight=1.0, damping=1e-2, split_damping=False):
        if rho is not None and not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be None (ELBO-exact) or a finite number > 0, got {rho}; "
                             "for a point mass (plain K-FAC) use KroneckerDelta")
        if not (kl_weight > 0 and math.isfinite(kl_weight)):
            raise ValueError(f"kl_weight must be positive and finite, got {kl_weight}")
        super().__init__(model, damping, split_damping)
        self._rho = None if rho is None else float(rho)
        self.kl_weight = float(kl_weight)

    @classmethod
    def from_guide(cls, guide, rho=None, kl_weight=1.0):
        r"""A Gaussian with ``guide``'s mean μ, curvature F̂, damping and model (copies, not shared):
        around a K-FAC solution (a :class:`KroneckerDelta`) the ELBO-exact ``rho=None`` gives the
        Kronecker-factored Laplace approximation (Ritter et al. 2018) from the curvature the
        training already kept, Σ = (κ/N)(F̂ + κ/(Nη)I)⁻¹ — η (the model's ``prior_variance``) and
        κ are then the knobs of its calibration, read whenever q is drawn from."""
        posterior = cls(guide.model, rho, kl_weight, guide.damping, guide.split_damping)
        state = guide.state_dict()
        state["_extra_state"] = posterior.get_extra_state()
        posterior.load_state_dict(state)
        return posterior

    def config(self):
        return {**super().config(), "rho": self._rho, "kl_weight": self.kl_weight}

    @property
    def elbo_exact(self):
        return self._rho is None

    @property
    def rho(self):
        """ρ: √(κ/N) in the ELBO-exact mode, else the fixed value."""
        return math.sqrt(self.kl_weight / self.model.num_data) if self.elbo_exact else self._rho

    @property
    def prior_precision(self):
        """π = κ/(Nη) in the ELBO-exact mode, else 0 (module doc)."""
        return self.kl_weight / (self.model.num_data * self.model.prior_variance) if self.elbo_exact else 0.0

    def posterior_eigenvalues(self):
        """Per block, the eigenvalues of Σ⁻¹/ρ²: those of F̂ + πI (exact) in the ELBO-exact mode, those
        of the preconditioner's F̂ + γI (eq. 12) in the paper's."""
        if self.elbo_exact:
            return [block.curvature.eigenvalues(self.prior_precision) for block in self.blocks]
        return self.preconditioner()

    def spectral_terms(self):
        """The :class:`SpectralTerms`, kept until the spectrum of any block changes (a refresh,
        ``load_state_dict``) or ρ, γ or η does — one check for all blocks (:mod:`pyro_kfacvi.memo`)."""
        key = (self.rho, self.prior_precision, self.damping, self.split_damping, self.model.prior_variance)
        return self.derived.get("spectral terms", self._gather()[1], key, self.compute_spectral_terms)

    def compute_spectral_terms(self):
        """:class:`SpectralTerms` from the current spectra, without the memo. A block the model did
        not choose to be Bayesian has S = 0, sums (0, 0), and adds the normaliser ½D_P log(2πη) of
        its MAP prior term −log p(μ_P) to the constant in place of the KL's terms (:meth:`kl_to_prior`)."""
        rho, eta = self.rho, self.model.prior_variance
        scales, sums, d_bayesian, d_point = [], [], 0, 0
        for block, e in zip(self.blocks, self.posterior_eigenvalues()):
            if block.bayesian:
                scales.append(rho * e.rsqrt())
                sums.append(scale_sums_of(scales[-1]))
                d_bayesian += e.numel()
            else:
                scales.append(torch.zeros_like(e))
                sums.append((e.new_zeros(()), e.new_zeros(())))
                d_point += e.numel()
        trace, log_det = sum(variances for _, variances in sums), sum(2 * logs for logs, _ in sums)
        kl = 0.5 * (trace / eta - d_bayesian + d_bayesian * math.log(eta) - log_det)
        return SpectralTerms(scales, sums, kl + 0.5 * d_point * math.log(2 * math.pi * eta))

    def scales(self):
        """Per block, S = ρ/√(eigenvalues of Σ⁻¹/ρ²), q's standard deviations in the eigenbasis,
        with its sums (Σ log S, Σ S²)."""
        terms = self.spectral_terms()
        return list(zip(terms.scales, terms.scale_sums))

    def distributions(self):
        """N(μ, Σ) per block (class doc); a point mass at μ for a layer the model did not choose."""
        terms = self.spectral_terms()
        return [EigenbasisNormal(block.loc, scale, block.curvature, sums) if block.bayesian
                else dist.Delta(block.loc, event_dim=block.loc.dim())
                for block, scale, sums in zip(self.blocks, terms.scales, terms.scale_sums)]

    def sample_eigenbasis_blocks(self, num_samples, noise=None):
        """Q_Gᵀ μ Q_A + ε ⊙ S per block (eq. 12 in eigenbasis coordinates), elementwise."""
        means = self.means()
        shapes = [(num_samples, *mean.shape) for mean in means]
        if noise is None:
            sizes = [math.prod(shape) for shape in shapes]
            flat = torch.randn(sum(sizes), dtype=means[0].dtype, device=means[0].device).split(sizes)
            noises = [part.view(shape) for part, shape in zip(flat, shapes)]
        else:
            noises = noise(shapes)
        return torch._foreach_addcmul(means, noises, self.spectral_terms().scales)

    def covariance_trace(self):
        """tr Σ = Σ S² over the eigenbasis scales of all blocks (kept with the spectral terms)."""
        return sum(variances for _, variances in self.spectral_terms().scale_sums)

    def kl_to_prior(self):
        """KL(q ‖ N(0, ηI)) = ½[(tr Σ + ‖μ‖²)/η − D + D log η − log|Σ|] over all D parameters. The
        terms in Σ change only with the eigenbases and are kept until then (:meth:`spectral_terms`).
        With some layers point masses (``BayesianModel(bayesian=...)``) it is the KL of the Bayesian
        blocks plus the MAP prior term of the others, −log p(μ_P) = ½‖μ_P‖²/η + ½D_P log(2πη)."""
        eta = self.model.prior_variance
        return torch.add(self.spectral_terms().kl_constant, self.mean_squared_norm(), alpha=0.5 / eta)

    def complexity(self):
        """κ·KL(q‖p)/N."""
        return self.kl_to_prior() * (self.kl_weight / self.model.num_data)
