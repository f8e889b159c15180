"""Observation models p(y | x, θ) for :class:`~pyro_kfacvi.BayesianModel`.

A likelihood turns the network output into a Pyro distribution, draws labels from it
(for the Monte Carlo Fisher, ``fisher="mc"``) and averages per-sample predictions into the
posterior predictive of eq. (1), p(y | x, D) ≈ (1/S) Σ_s p(y | x, θ_s).
"""
import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F


class Categorical:
    """Classification: the network outputs logits of shape ``(..., C)``."""

    def distribution(self, output, validate_args=None):
        return dist.Categorical(logits=output, validate_args=validate_args)

    def nll(self, output, y):
        """Σ −log p(y | output) over all leading dimensions of the ``(..., C)`` logits (``y`` broadcast
        against them): one fused cross-entropy, equal to ``-distribution(output).log_prob(y).sum()``."""
        labels = y.expand(output.shape[:-1]).reshape(-1).long()
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels, reduction="sum")

    def check_targets(self, y):
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


class Gaussian:
    """Regression with a fixed noise scale σ: y ~ N(f(x, θ), σ²I), output shape ``(..., D)``."""

    def __init__(self, scale):
        if not scale > 0:
            raise ValueError(f"Gaussian noise scale must be positive, got {scale}")
        self.scale = float(scale)

    def distribution(self, output, validate_args=None):
        return dist.Normal(output, self.scale, validate_args=validate_args).to_event(1)

    def nll(self, output, y):
        """Σ −log N(y; output, σ²I) over all leading dimensions (``y`` broadcast against them)."""
        normalizer = output.numel() * (math.log(self.scale) + 0.5 * math.log(2 * math.pi))
        return 0.5 * (output - y).div(self.scale).square().sum() + normalizer

    def check_targets(self, y):
        if not y.is_floating_point():
            raise TypeError(f"Gaussian targets must be a floating-point tensor, got dtype {y.dtype}")
        if y.dim() != 2:
            raise ValueError(f"Gaussian targets must have shape (batch, dim), got {tuple(y.shape)}")

    def support(self, output_shape):
        return "the finite real numbers"

    def invalid_targets(self, y, output_shape):
        """Mask of the targets with a NaN or Inf entry."""
        return ~torch.isfinite(y).all(-1)

    def predict(self, outputs):
        """Per-sample predictive means, shape ``(S, N, D)``."""
        return outputs

    def predictive(self, outputs):
        """Predictive mean and variance: E_s[f_s] and Var_s[f_s] + σ² (law of total variance)."""
        return outputs.mean(0), outputs.var(0, unbiased=False) + self.scale ** 2
