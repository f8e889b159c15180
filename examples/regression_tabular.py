"""Tabular regression with learned noise and prior, and the exact answer for the last layer
(docs/regression.md).

Data: Friedman's first benchmark function (Friedman 1991), x ~ U[0, 1]^10 and
y = 10 sin(π x₁x₂) + 20 (x₃ − 0.5)² + 10 x₄ + 5 x₅ + N(0, 1) (x₆ … x₁₀ do not matter), 1,000
(and then 4,000) training and 1,000 test examples drawn from a seeded generator; the targets are
standardised with the training mean and standard deviation, and σ is reported in the units of y
(true σ = 1).

1. A 10-50-50-1 tanh network, ``Gaussian()`` (σ learned), η = 1 or ``prior_variance="auto"`` (η
   learned), ELBO-exact Noisy K-FAC in minibatches of 100: test RMSE, the test NLL of the Gaussian
   predictive N(mean, variance), the coverage of its 95% intervals, and on the training inputs the
   RMSE of the predictive mean and the epistemic sd (the learned σ² is about their squares' sum).
2. The exact answer where one exists: with the network's last hidden features φ(x) fixed (at the
   posterior mean), the last layer is Bayesian linear regression, whose evidence p(y | σ, η) and
   posterior are closed-form. MacKay's evidence updates (γ = Σᵢ ηλᵢ/(σ² + ηλᵢ), η = ‖m‖²/γ,
   σ² = ‖y − Φm‖²/(N − γ), λ the eigenvalues of ΦᵀΦ, Φ with a column of ones) give the maximiser; KFAC-VI fits the
   same model, ``BayesianModel(nn.Linear(50, 1), Gaussian(rate=0.1), "auto", N)`` on φ(x)
   full-batch, and the script compares σ, η and the test predictive's mean and standard deviation.

About two minutes on two cores (four networks).

    python examples/regression_tabular.py
"""
import argparse
import math
import time

import pyro
import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, CurvatureConfig, Gaussian, KroneckerNormal, Predictive, WarmupPolynomialLR

NUM_TEST, HIDDEN, BATCH = 1000, 50, 100


def friedman1(n, generator):
    """Friedman #1 with unit noise: x ~ U[0, 1]^10, y of shape (n, 1)."""
    x = torch.rand(n, 10, generator=generator, dtype=torch.float64)
    f = (10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4])
    return x, (f + torch.randn(n, generator=generator, dtype=torch.float64))[:, None]


def train(model, x, y, steps, batch_size, num_particles):
    """ELBO-exact Noisy K-FAC on ``model``, minibatches drawn in epochs; returns the guide."""
    guide = KroneckerNormal(model)
    schedule = WarmupPolynomialLR(0.1, 0.1, total_steps=steps, steps_per_epoch=1, warmup_steps=0, power=1.0)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.0, kl_clip=None, num_particles=num_particles,
                    curvature=CurvatureConfig(fisher="mc", beta=0.1, inverse_every=1))
    order = torch.randperm(len(x))
    for step in range(steps):
        start = (step * batch_size) % len(x)
        if start == 0:
            order = torch.randperm(len(x))
        batch = order[start:start + batch_size]
        engine.step(x[batch], y[batch])
    return guide


def scores(mean, variance, y, scale):
    """RMSE, NLL per example and 95% coverage of N(mean, variance) for targets ``y``, in the units of
    y (standardised values times ``scale``)."""
    mean, sd, y = mean * scale, variance.sqrt() * scale, y * scale
    nll = (0.5 * ((y - mean) / sd) ** 2 + sd.log() + 0.5 * math.log(2 * math.pi)).mean()
    coverage = ((y - mean).abs() <= 1.96 * sd).double().mean()
    return {"rmse": (y - mean).pow(2).mean().sqrt().item(), "nll": nll.item(), "coverage": coverage.item()}


def evidence_maximiser(phi, y, iterations=500):
    """MacKay's evidence updates for y = Φw + b + N(0, σ²), (w, b) ~ N(0, ηI): (σ², η, mean m,
    covariance S) at the maximiser of p(y | σ, η)."""
    design = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], 1)
    lam = torch.linalg.eigvalsh(design.T @ design)
    variance, eta = 1.0, 1.0
    for _ in range(iterations):
        covariance = torch.linalg.inv(design.T @ design / variance + torch.eye(design.shape[1], dtype=phi.dtype) / eta)
        mean = covariance @ design.T @ y / variance
        gamma = (eta * lam / (variance + eta * lam)).sum().item()  # well-determined parameters
        eta = (mean.pow(2).sum() / gamma).item()
        variance = ((y - design @ mean).pow(2).sum() / (len(y) - gamma)).item()
    covariance = torch.linalg.inv(design.T @ design / variance + torch.eye(design.shape[1], dtype=phi.dtype) / eta)
    return variance, eta, covariance @ design.T @ y / variance, covariance


def run(num_train, prior_variance, args):
    """Parts 1 and 2 on ``num_train`` training examples, the network's prior variance
    ``prior_variance``; prints their results."""
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(1)
    x, y = friedman1(num_train, generator)
    x_test, y_test = friedman1(NUM_TEST, generator)
    y_mean, y_scale = y.mean(), y.std()
    y, y_test = (y - y_mean) / y_scale, (y_test - y_mean) / y_scale

    start = time.perf_counter()
    net = nn.Sequential(nn.Linear(10, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    model = BayesianModel(net.double(), Gaussian(), prior_variance=prior_variance, num_data=num_train)
    guide = train(model, x, y, args.steps, BATCH, num_particles=8)
    prediction = Predictive(model, guide, num_samples=200)(x_test)
    on_train = Predictive(model, guide, num_samples=200)(x)
    print(f"N = {num_train}, prior variance {prior_variance}\n1. network ({time.perf_counter() - start:.0f} s): learned σ "
          f"{float(model.likelihood.scale) * y_scale:.3f} (true 1), η {model.prior_variance:.4f}; "
          + ", ".join(f"test {k} {v:.3f}" for k, v in scores(prediction.mean, prediction.variance, y_test, y_scale).items())
          + f"\n   on the training inputs: RMSE of the predictive mean {(on_train.mean - y).pow(2).mean().sqrt() * y_scale:.3f}, "
          f"mean epistemic sd {on_train.epistemic.mean().sqrt() * y_scale:.3f}")

    start = time.perf_counter()
    features = guide.mean_network()[:-1]  # φ(x) at the posterior mean
    with torch.no_grad():
        phi, phi_test = features(x), features(x_test)
    variance, eta, mean, covariance = evidence_maximiser(phi, y)
    design_test = torch.cat([phi_test, torch.ones(NUM_TEST, 1, dtype=phi.dtype)], 1)
    exact_mean = design_test @ mean
    exact_variance = (design_test @ covariance * design_test).sum(1, keepdim=True) + variance

    last = BayesianModel(nn.Linear(HIDDEN, 1).double(), Gaussian(rate=0.1), prior_variance="auto", num_data=num_train)
    last_guide = train(last, phi, y, args.last_layer_steps, num_train, num_particles=16)
    ours = Predictive(last, last_guide, num_samples=4000)(phi_test)
    print(f"2. last layer, exact (MacKay):  σ {math.sqrt(variance) * y_scale:.4f}, η {eta:.5f}; "
          + ", ".join(f"test {k} {v:.3f}" for k, v in scores(exact_mean, exact_variance, y_test, y_scale).items()))
    print(f"   last layer, KFAC-VI ({time.perf_counter() - start:.0f} s): σ {float(last.likelihood.scale) * y_scale:.4f}, "
          f"η {last.prior_variance:.5f}; "
          + ", ".join(f"test {k} {v:.3f}" for k, v in scores(ours.mean, ours.variance, y_test, y_scale).items()))
    exact_epistemic = exact_variance - variance
    print(f"   KFAC-VI against exact: σ {float(last.likelihood.scale) / math.sqrt(variance) - 1:+.2%}, "
          f"η {last.prior_variance / eta - 1:+.2%}; test predictive: mean max |Δ| "
          f"{(ours.mean - exact_mean).abs().max() * y_scale:.4f} (units of y), sd max relative error "
          f"{(ours.variance.sqrt() / exact_variance.sqrt() - 1).abs().max():.2%}, epistemic sd max relative error "
          f"{(ours.epistemic.sqrt() / exact_epistemic.sqrt() - 1).abs().max():.2%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--prior-variance", nargs="+", default=["1", "auto"], help="η of the network: numbers or auto")
    parser.add_argument("--steps", type=int, default=2000, help="natural-gradient steps of the network")
    parser.add_argument("--last-layer-steps", type=int, default=300)
    args = parser.parse_args()
    for num_train in args.num_train:
        for prior_variance in args.prior_variance:
            run(num_train, prior_variance if prior_variance == "auto" else float(prior_variance), args)


if __name__ == "__main__":
    main()
