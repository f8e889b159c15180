"""The guide's posterior against closed forms: exact Bayesian linear regression, sampling
covariance, log density and KL against dense references."""
import pyro
import pytest
import torch
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerDelta,
                         KroneckerNormal, WarmupPolynomialLR)


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test of this module in float64 (conftest's fixture)."""


def guide_draws(guide, x, num_samples, sites):
    """Draws through the Pyro guide interface (a vectorised ``poutine.trace`` under a plate)."""
    with pyro.plate("draws", num_samples, dim=-1):
        trace = pyro.poutine.trace(guide).get_trace(x)
    return [trace.nodes[site]["value"] for site in sites]


def column_major(weight, bias):
    """vec(W̃) of W̃ = [W | b], columns stacked, for each leading sample."""
    matrix = torch.cat([weight, bias.unsqueeze(-1)], -1)
    return matrix.transpose(-1, -2).reshape(*matrix.shape[:-2], -1)


def relative_error(estimate, reference):
    return ((estimate - reference).norm() / reference.norm()).item()


def test_exact_posterior_of_bayesian_linear_regression():
    n, d, k, sigma, eta = 200, 3, 2, 0.5, 2.0
    x = torch.randn(n, d)
    y = x @ torch.randn(k, d).T + torch.randn(k) + sigma * torch.randn(n, k)
    model = BayesianModel(nn.Linear(d, k), Gaussian(sigma), eta, n)
    guide = KroneckerNormal(model, damping=0.0)  # ELBO-exact Noisy K-FAC
    schedule = WarmupPolynomialLR(0.5, 0.5, total_steps=400, steps_per_epoch=1, warmup_steps=0, power=1.0)
    engine = KFACVI(model, guide, lr=schedule, num_particles=16,
                    curvature=CurvatureConfig(fisher="mc", beta=0.02, inverse_every=1))
    for _ in range(400):
        engine.step(x, y)

    # closed form: rows of W̃ independent, each N(Λ⁻¹ X̃ᵀ y / σ², Λ⁻¹) with Λ = X̃ᵀX̃/σ² + I/η
    xt = torch.cat([x, torch.ones(n, 1)], 1)
    covariance = torch.linalg.inv(xt.T @ xt / sigma**2 + torch.eye(d + 1) / eta)
    mean = covariance @ xt.T @ y / sigma**2
    true_mean = mean.reshape(-1)  # column-major vec of W̃ = row-major flattening of W̃ᵀ
    true_cov = torch.kron(covariance.contiguous(), torch.eye(k))

    weight, bias = guide_draws(guide, x, 50_000, ["weight", "bias"])
    draws = column_major(weight, bias)
    assert relative_error(draws.mean(0), true_mean) <= 0.02
    assert relative_error(torch.cov(draws.T), true_cov) <= 0.05


def small_guide(rho, damping, bias=True, split_damping=False):
    model = BayesianModel(nn.Linear(3, 2, bias=bias), Categorical(), 0.7, 100)
    guide = KroneckerNormal(model, rho=rho, damping=damping, split_damping=split_damping)
    curvature = guide.blocks[0].curvature
    d_in = 3 + bias
    a, g = torch.randn(d_in, d_in), torch.randn(2, 2)
    set_factors(curvature, (a @ a.T / d_in, g @ g.T / 2))
    return model, guide, curvature


def set_factors(curvature, factors):
    """F̂ = ``factors`` and their eigenbases (the mean's eigenbasis coordinates are kept)."""
    curvature.commit(factors, curvature.decompose(factors))


def split_damped(curvature, damping):
    """(A + π√γ I) ⊗ (G + √γ/π I) with π² = (tr A/d_A)/(tr G/d_G), dense."""
    a, g = curvature.A, curvature.G
    pi = ((a.trace() / len(a)) / (g.trace() / len(g))).sqrt()
    return torch.kron(a + pi * damping**0.5 * torch.eye(len(a)), g + damping**0.5 / pi * torch.eye(len(g)))


@pytest.mark.parametrize("split_damping", [False, True])
def test_samples_have_the_damped_kronecker_covariance(split_damping):
    rho, damping = 0.5, 0.1
    _, guide, curvature = small_guide(rho, damping, split_damping=split_damping)
    damped = split_damped(curvature, damping) if split_damping else curvature.dense() + damping * torch.eye(8)
    dense = rho**2 * torch.linalg.inv(damped)
    weight, bias = guide_draws(guide, torch.zeros(1, 3), 200_000, ["weight", "bias"])
    draws = column_major(weight, bias)
    assert relative_error(draws.mean(0), column_major(*guide.blocks[0].split(guide.blocks[0].loc).values())) < 0.02
    assert relative_error(torch.cov(draws.T), dense) < 0.02


def test_log_q_and_kl_match_dense_gaussian():
    rho, damping = 0.3, 0.05
    model, guide, curvature = small_guide(rho, damping, bias=False)
    loc = guide.blocks[0].loc
    dense = torch.distributions.MultivariateNormal(
        loc.T.reshape(-1), rho**2 * torch.linalg.inv(curvature.dense() + damping * torch.eye(6)))
    draws = guide.sample_blocks(5)
    expected = dense.log_prob(draws[0].transpose(-1, -2).reshape(5, -1))
    assert torch.allclose(guide.log_q(draws), expected, rtol=1e-10)
    prior = torch.distributions.MultivariateNormal(torch.zeros(6), model.prior_variance * torch.eye(6))
    assert torch.allclose(guide.kl_to_prior(), torch.distributions.kl_divergence(dense, prior), rtol=1e-10)


def test_point_mass_guide_returns_its_mean():
    model = BayesianModel(nn.Linear(3, 2), Categorical(), 1.0, 10)
    guide = KroneckerDelta(model)
    weight, bias = guide_draws(guide, torch.zeros(1, 3), 4, ["weight", "bias"])
    assert torch.equal(weight, model.net.weight.detach().expand(4, 2, 3))
    assert torch.equal(bias, model.net.bias.detach().expand(4, 2))


def test_split_damping_preconditions_with_the_damped_factors():
    """split_damping: (A + π√γ I) ⊗ (G + √γ/π I) with π² = (tr A/d_A)/(tr G/d_G), against a dense solve."""
    damping = 0.04
    model = BayesianModel(nn.Linear(3, 2), Categorical(), 1.0, 100)
    guide = KroneckerNormal(model, rho=0.5, damping=damping, split_damping=True)
    curvature = guide.blocks[0].curvature
    a, g = torch.randn(4, 4), torch.randn(2, 2)
    a, g = a @ a.T, g @ g.T
    set_factors(curvature, (a, g))
    dense = split_damped(curvature, damping)
    grad = torch.randn(2, 4)
    expected = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(4, 2).T
    engine, mean = KFACVI(model, guide, lr=1.0, kl_clip=None), guide.blocks[0].eigenbasis_loc
    before = mean.clone()
    engine.update([curvature.to_eigenbasis(grad)], lr=1.0, momentum=0.0)  # eqs. (10, 11) in the eigenbasis
    preconditioned = before - mean
    torch.testing.assert_close(curvature.from_eigenbasis(preconditioned), expected)
    q = guide.distributions()[0]
    torch.testing.assert_close(q.scale**2, 0.25 / curvature.split_eigenvalues(damping))

