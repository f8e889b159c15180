"""Observation models p(y | x, θ) for :class:`~pyro_kfacvi.BayesianModel`.

A likelihood turns the network output into a Pyro distribution, draws labels from it
(for the Monte Carlo Fisher, ``fisher="mc"``) and averages per-sample predictions into the
posterior predictive of eq. (1), p(y | x, D) ≈ (1/S) Σ_s p(y | x, θ_s).

A likelihood is a module of its :class:`~pyro_kfacvi.BayesianModel`: what it learns during
training (the noise of ``Gaussian(scale=None)``) lives in its buffers and travels in the model's
``state_dict()``.
"""
import math
from typing import NamedTuple

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


class Likelihood(nn.Module):
    """The hyperparameter-learning contract of a likelihood, with nothing to learn by default.

    During a step the curvature estimator sums :meth:`statistics` over the weight samples and the
    minibatch (and over ranks), divides by the count of (sample, example) pairs, checks them for
    finiteness with the gradients, and after the committed step the model hands the means to
    :meth:`update`."""

    remedy = "check the targets"

    def statistics(self, output, y):
        """Sums over all (sample, example) pairs of what the likelihood learns from: none here."""
        return ()

    def update(self, statistics):
        """Learn from the means of :meth:`statistics` over a step's (sample, example) pairs."""

    def config(self):
        """The constructor's arguments, by name (with ``"family"``, the class): what
        :func:`pyro_kfacvi.io.load` rebuilds the likelihood from."""
        return {"family": type(self).__name__}


class Categorical(Likelihood):
    """Classification: the network outputs logits of shape ``(..., C)``."""

    remedy = "check the labels against the network's output size"

    def distribution(self, output, validate_args=None):
        return dist.Categorical(logits=output, validate_args=validate_args)

    def nll(self, output, y):
        """Σ −log p(y | output) over all leading dimensions of the ``(..., C)`` logits (``y`` broadcast
        against them): one fused cross-entropy, equal to ``-distribution(output).log_prob(y).sum()``."""
        labels = y.expand(output.shape[:-1]).reshape(-1).long()
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels, reduction="sum")

    def check_targets(self, y, output_shape):
        """Dtype and shape of the labels ``y`` for a network output of ``output_shape`` per example."""
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"Categorical labels must be an integer tensor, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"Categorical labels must have shape (batch,), got {tuple(y.shape)}")

    def support(self, output_shape):
        return f"the class indices 0..{output_shape[-1] - 1} of the network's {output_shape[-1]} outputs"

    def invalid_targets(self, y, output_shape):
        """Mask of the labels that are not class indices of the ``(..., C)`` output."""
        return (y < 0) | (y >= output_shape[-1])

    def predict(self, outputs):
        """Per-sample class probabilities, shape ``(S, N, C)``."""
        return outputs.softmax(-1)

    def predictive(self, outputs):
        """Eq. (1): the softmax averaged over the S posterior samples, shape ``(N, C)``."""
        return self.predict(outputs).mean(0)


class GaussianPrediction(NamedTuple):
    """The posterior predictive of a Gaussian likelihood per output, each ``(N, D)``:

    ``variance`` = ``epistemic`` + ``aleatoric`` (law of total variance), with ``epistemic`` =
    Var_s[f(x, θ_s)] over the posterior samples and ``aleatoric`` = σ², the observation noise."""

    mean: torch.Tensor
    variance: torch.Tensor
    epistemic: torch.Tensor
    aleatoric: torch.Tensor


class Gaussian(Likelihood):
    r"""Regression: y ~ N(f(x, θ), σ²I) with network outputs and targets of shape ``(batch, D)``.

    ``Gaussian(scale=s)`` keeps σ = s. ``Gaussian(scale=None)`` learns a homoscedastic σ by type-II
    maximum likelihood inside the ELBO: its σ-dependent part,

    .. math:: −ND \log σ − \frac{1}{2σ^2} E_q\Big[\sum_n ‖y_n − f(x_n, θ)‖^2\Big],

    is maximal at σ² = E_q[(1/(ND)) Σ_n ‖y_n − f(x_n, θ)‖²]. Each step estimates it by the minibatch's
    mean squared residual s_t over its M weight samples θ_s ~ q (:meth:`statistics`), and σ²
    follows the estimates (:meth:`update`), since q moves while it trains:

    .. math:: σ^2_t = σ^2_{t−1} + r\,(s_t − σ^2_{t−1}), \qquad σ_0 = \text{init\_scale},

    an exponential moving average with weight r = ``rate`` (a memory of about 1/r steps). The
    initial σ is small on purpose: while the network first fits, a σ as large as the targets'
    spread would let the noise explain the data, and with ``prior_variance="auto"`` the prior then
    shrinks before the fit begins — a local optimum of the ELBO with σ ≈ sd(y) (docs/regression.md).
    Standardise the targets; ``init_scale`` and σ are in their units. :attr:`scale` is the float s,
    or the learned σ as a 0-d tensor (a buffer: it moves with the model and round-trips through
    ``model.state_dict()``).

    :param float scale: σ, or ``None`` to learn it.
    :param float init_scale: the learned σ before the first step.
    :param float rate: r, the weight of a step's estimate.
    """

    remedy = "repair or drop those examples"

    def __init__(self, scale=None, init_scale=0.1, rate=0.01):
        super().__init__()
        for name, value in (("scale", scale), ("init_scale", init_scale)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Gaussian noise {name} must be positive and finite, got {value}")
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.fixed_scale = None if scale is None else float(scale)
        self.init_scale, self.rate = float(init_scale), float(rate)
        if self.learned:
            self.register_buffer("learned_variance", torch.tensor(self.init_scale ** 2))

    @property
    def learned(self):
        return self.fixed_scale is None

    @property
    def scale(self):
        """σ: the fixed float, or the learned value as a 0-d tensor."""
        return self.learned_variance.sqrt() if self.learned else self.fixed_scale

    @property
    def variance(self):
        """σ², a float or a 0-d tensor like :attr:`scale`."""
        return self.learned_variance if self.learned else self.fixed_scale ** 2

    def config(self):
        return {**super().config(), "scale": self.fixed_scale, "init_scale": self.init_scale, "rate": self.rate}

    def distribution(self, output, validate_args=None):
        return dist.Normal(output, self.scale, validate_args=validate_args).to_event(1)

    def nll(self, output, y):
        """Σ −log N(y; output, σ²I) over all leading dimensions (``y`` broadcast against them)."""
        scale = self.scale
        log_scale = scale.log() if torch.is_tensor(scale) else math.log(scale)
        normalizer = output.numel() * (log_scale + 0.5 * math.log(2 * math.pi))
        return 0.5 * (output - y).div(scale).square().sum() + normalizer

    def statistics(self, output, y):
        """Learned σ: Σ over (sample, example) pairs of the mean squared residual ‖y − f‖²/D."""
        return ((output.detach() - y).square().mean(-1).sum(),) if self.learned else ()

    @torch.no_grad()
    def update(self, statistics):
        """Learned σ: σ² ← σ² + r (s_t − σ²) with s_t the step's mean squared residual (class doc);
        on the device, without a host synchronisation."""
        if self.learned:
            (estimate,) = statistics
            self.learned_variance.lerp_(estimate.to(self.learned_variance.dtype), self.rate)

    def check_targets(self, y, output_shape):
        """Targets ``y`` of the network output's shape per example, ``(batch, D)``."""
        if not y.is_floating_point():
            raise TypeError(f"Gaussian targets must be a floating-point tensor, got dtype {y.dtype}")
        if len(output_shape) != 1:
            raise ValueError(f"Gaussian regression needs a network output of shape (batch, D); this network gives "
                             f"{tuple(output_shape)} per example")
        if tuple(y.shape[1:]) != tuple(output_shape):
            hint = " (y.unsqueeze(-1) for one target per example)" if y.dim() == 1 and output_shape == (1,) else ""
            raise ValueError(f"Gaussian targets must have the network output's shape per example: the network gives "
                             f"{tuple(output_shape)} per example, y has shape {tuple(y.shape)}; pass targets of shape "
                             f"({y.shape[0]}, {output_shape[0]}){hint}")

    def support(self, output_shape):
        return "the finite real numbers"

    def invalid_targets(self, y, output_shape):
        """Mask of the targets with a NaN or Inf entry."""
        return ~torch.isfinite(y).all(-1)

    def predict(self, outputs):
        """Per-sample predictive means, shape ``(S, N, D)``."""
        return outputs

    def predictive(self, outputs):
        """The :class:`GaussianPrediction`: E_s[f_s], and Var_s[f_s] + σ² (law of total variance)."""
        epistemic = outputs.var(0, unbiased=False)
        aleatoric = torch.zeros_like(epistemic) + self.variance
        return GaussianPrediction(outputs.mean(0), epistemic + aleatoric, epistemic, aleatoric)
