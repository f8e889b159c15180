r"""The statistics of one minibatch, eqs. (7) and (8), for M weight samples at once.

For the weight samples θ_1 … θ_M (in the eigenbasis coordinates of :mod:`pyro_kfacvi.guides`)
one sampled forward pass (:func:`~pyro_kfacvi.layers.run_sampled`) and one backward pass give

* (7) ḡ = −(1/MB) Σ_s Σ_n ∇_θ log p(y_n | x_n, θ_s), per block in eigenbasis coordinates;
* (8) F̄ = (1/MB) Σ_s Σ_n of the same per-example outer products, as A ⊗ G per Kronecker block
  (:class:`~pyro_kfacvi.curvature.capture.Recorder`) or a diagonal for BatchNorm, in the weights'
  coordinates — with the observed labels (``fisher="empirical"``) or labels drawn from the
  model's predictive (``fisher="mc"``, the true Fisher's Monte Carlo estimate; a second backward).

The samples are processed ``chunk_size`` at a time, so that memory stays bounded in M.
"""
import math
from dataclasses import dataclass

import torch

from ..layers import run_sampled
from .capture import KFAC_APPROXIMATIONS, Recorder

FISHER_TYPES = ("empirical", "mc")


@dataclass(frozen=True)
class CurvatureConfig:
    """How the engine estimates and refreshes the curvature.

    :param str fisher: ``"empirical"`` (observed labels) or ``"mc"`` (labels drawn from the model).
    :param str kfac_approx: ``"expand"`` (KFC, the paper's) or ``"reduce"`` (T times cheaper for a
        layer shared over T positions; :mod:`pyro_kfacvi.curvature.capture`).
    :param float beta: β of eq. (9), the weight of the new estimate in the moving average.
    :param int curvature_every: compute F̄ (eq. 8) every k steps.
    :param int inverse_every: recompute the eigenbases of F̂ every k' steps.
    :param bool track_eigenvalues: between eigendecompositions, give every update of F̂ its
        eigenvalues in the kept eigenbases, the Rayleigh quotients diag(Q_Aᵀ A Q_A) and
        diag(Q_Gᵀ G Q_G) — the eigenvalues themselves right after a decomposition, and of the
        matrices diagonal in those bases the nearest to A and G (Frobenius) after; a d³ product per
        factor instead of an eigendecomposition, so that F̂'s scale follows the factors while the bases
        are refreshed rarely. ``False``: the eigenvalues change only with the bases.
    :param int chunk_size: weight samples per batched pass; default ``max(1, 1024 // B)``.
    """

    fisher: str = "empirical"
    kfac_approx: str = "expand"
    beta: float = 0.05
    curvature_every: int = 1
    inverse_every: int = 10
    track_eigenvalues: bool = False
    chunk_size: int | None = None

    def __post_init__(self):
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {self.fisher!r}")
        if self.kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {self.kfac_approx!r}")
        if not (0 < self.beta <= 1):
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        for name in ("curvature_every", "inverse_every", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value}")


def flatten(factors):
    """The tensors of per-block factor tuples, as one list."""
    return [f for fs in factors for f in fs]


def all_finite(tensors, norms):
    """Whether every entry of every tensor is finite, given their 2-norms as numbers (NaN and ±Inf
    propagate through a norm, e.g. ``torch._foreach_norm``'s, one fused reduction for all): only a
    tensor whose norm is not finite (a non-finite entry, or an overflow) is checked entry by entry."""
    return all(math.isfinite(norm) or bool(torch.isfinite(t).all()) for t, norm in zip(tensors, norms, strict=True))


@dataclass
class Statistics:
    """Sums over ``count`` (sample, example) pairs of one minibatch: the negative log-likelihood,
    the gradient per block (eq. 7, times the count), when curvature is computed the factor sums
    per block (eq. 8: ``(A, G)`` or ``(diag,)``; ``None`` otherwise), and the likelihood's own
    statistics (:meth:`Likelihood.statistics <pyro_kfacvi.likelihoods.Likelihood.statistics>`, e.g.
    the squared residuals from which ``Gaussian(scale=None)`` learns σ; empty for most
    likelihoods). :meth:`means` divides."""

    nll: torch.Tensor
    grads: list
    factors: list | None
    count: int
    likelihood_stats: tuple = ()

    def tensors(self):
        """The gradients, factors and likelihood statistics as one list."""
        return [*self.grads, *flatten(self.factors or []), *self.likelihood_stats]

    def means_(self):
        """The statistics per (sample, example): ḡ of eq. (7), F̄ of eq. (8), the likelihood's
        statistics and the mean NLL — the sums divided by the count in place (no second copy of the
        gradients and factors), so the sums are consumed."""
        torch._foreach_div_(self.tensors(), self.count)
        self.nll, self.count = self.nll / self.count, 1
        return self

    def all_finite(self, loss):
        """Whether ``loss`` (a tensor), every gradient and every factor are finite, at one host
        synchronisation (:func:`all_finite`); returns ``(finite, loss as a number)``."""
        tensors = self.tensors()
        loss, *norms = torch.stack([loss, *torch._foreach_norm(tensors)]).tolist()
        return math.isfinite(loss) and all_finite(tensors, norms), loss


def sum_over_samples(grad):
    """Σ over the leading sample dimension of ``grad`` (a view when there is one sample)."""
    return grad[0] if grad.shape[0] == 1 else grad.sum(0)


class FisherEstimator:
    """Eqs. (7, 8) as sums over the M weight samples and the minibatch (module doc).

    :param CurvatureConfig config: the Fisher type, the Kronecker approximation, the chunk size.
    """

    def __init__(self, config):
        self.config = config

    def sums(self, model, guide, x, y, block_samples, with_curvature=True):
        """:class:`Statistics` (sums) for ``block_samples`` ``(M, *block_shape)`` per block in
        eigenbasis coordinates (:meth:`KroneckerGuide.sample_eigenbasis_blocks
        <pyro_kfacvi.guides.KroneckerGuide.sample_eigenbasis_blocks>`); ḡ comes in the same
        coordinates, F̄ in the weights'."""
        num_samples, batch = block_samples[0].shape[0], x.shape[0]
        chunk = self.config.chunk_size or max(1, 1024 // batch)
        total = None
        for start in range(0, num_samples, chunk):
            part = block_samples if chunk >= num_samples else [s[start:start + chunk] for s in block_samples]
            stats = self._chunk(model, guide, x, y, part, with_curvature)
            if total is None:  # the first chunk's sums are fresh tensors: the rest accumulate into them
                total = stats
            else:
                total.nll = total.nll + stats.nll
                torch._foreach_add_(total.tensors(), stats.tensors())
                total.count += stats.count
        return total

    def _chunk(self, model, guide, x, y, block_samples, with_curvature):
        """Sums over one chunk of samples: NLL, weight gradients, curvature factors."""
        leaves = [s.detach().requires_grad_() for s in block_samples]
        recorder = Recorder(self.config.kfac_approx) if with_curvature else None
        params = guide.eigenbasis_layer_params(leaves)
        out = run_sampled(model.net, model.layers, params, x, leaves[0].shape[0], recorder)
        likelihood = model.likelihood
        nll = likelihood.nll(out, y)
        if with_curvature and self.config.fisher == "mc":  # G from a second backward pass, labels from the model
            recorder.capturing = False
            weight_grads = torch.autograd.grad(nll, leaves, retain_graph=True)
            recorder.capturing = True
            sampled = likelihood.distribution(out.detach(), validate_args=False).sample()
            # to the leaves, not to the layer outputs: an output modified in place since would stop
            # the pass after the in-place operation, before the hook (weight gradients are discarded)
            torch.autograd.grad(likelihood.nll(out, sampled), leaves)
        else:  # under the empirical Fisher the recorder's hooks take G from this backward pass
            weight_grads = torch.autograd.grad(nll, leaves)
        factors = [recorder.factors(block.name) for block in guide.blocks] if with_curvature else None
        grads = [sum_over_samples(g) for g in weight_grads]
        count = leaves[0].shape[0] * x.shape[0]
        return Statistics(nll.detach(), grads, factors, count, likelihood.statistics(out, y))
