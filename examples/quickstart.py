"""Quick start: K-FAC vs Noisy K-FAC on a 2-D toy problem, in a few seconds on a CPU.

Trains the same small network as a point estimate (``KroneckerDelta``, plain K-FAC) and as an
ELBO-exact Noisy K-FAC posterior (``KroneckerNormal``), then prints test accuracy and the
predictive entropy far from the data, where a Bayesian network should be unsure.

    python examples/quickstart.py
"""
import math

import pyro
import torch
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerDelta, KroneckerNormal,
                         Predictive)
from pyro_kfacvi.metrics import accuracy, predictive_entropy


def two_blobs(n, generator):
    y = torch.randint(0, 2, (n,), generator=generator)
    x = 0.7 * torch.randn(n, 2, generator=generator)
    x[:, 0] += 3.0 * y - 1.5
    return x, y


def train(family, x, y, generator, steps=300, damping=0.1):
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    model = BayesianModel(net, Categorical(), prior_variance=1.0, num_data=len(x))
    guide = family(model, damping=damping)
    engine = KFACVI(model, guide, lr=0.05, momentum=0.9, kl_clip=None, num_particles=guide.distinct_draws(8),
                    curvature=CurvatureConfig(beta=0.1))
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = engine.step(x[idx], y[idx])
    return model, guide, loss


def main():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = two_blobs(256, generator)
    x_test, y_test = two_blobs(2000, generator)
    angles = torch.linspace(0, 2 * math.pi, 64)
    far = 12.0 * torch.stack([angles.cos(), angles.sin()], 1)
    # γ damps the preconditioner only (Noisy K-FAC's Σ = (1/N)(F̂ + I/(Nη))⁻¹ does not see it): at γ = 0.1
    # the posterior's wide draws make lr 0.05 steps grow the mean far beyond the prior's scale
    runs = (("K-FAC (point estimate)", KroneckerDelta, 0.1), ("Noisy K-FAC (posterior)", KroneckerNormal, 1.0))
    for name, family, damping in runs:
        model, guide, loss = train(family, x, y, generator, damping=damping)
        predictive = Predictive(model, guide, num_samples=64)
        acc = accuracy(predictive(x_test), y_test)
        entropy = predictive_entropy(predictive(far)).mean().item()
        print(f"{name:24s} final loss {loss:.3f}  test accuracy {acc:.3f}  entropy far from the data {entropy:.3f} nats")


if __name__ == "__main__":
    main()
