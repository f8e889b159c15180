"""The guide families: the ELBO-exact posterior with a large extrinsic damping against the closed
form, the paper's eq. (12), and the guide's state with its family and configuration."""
import pyro
import pytest
import torch
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerDelta,
                         KroneckerNormal, Retry, WarmupPolynomialLR)
from pyro_kfacvi.guides import GuideStateError


def bayesian_linear_regression(n=400, d=6, k=3, sigma=0.7, eta=2.0):
    """Data, model and the closed-form posterior of vec(W̃) (column-major), W̃ = [W | b]: rows of W̃
    independent, each N(Λ⁻¹ X̃ᵀ y / σ², Λ⁻¹) with Λ = X̃ᵀX̃/σ² + I/η."""
    x = torch.randn(n, d)
    y = x @ torch.randn(k, d).T + torch.randn(k) + sigma * torch.randn(n, k)
    model = BayesianModel(nn.Linear(d, k), Gaussian(sigma), eta, n)
    xt = torch.cat([x, torch.ones(n, 1)], 1)
    covariance = torch.linalg.inv(xt.T @ xt / sigma**2 + torch.eye(d + 1) / eta)
    mean = (covariance @ xt.T @ y / sigma**2).reshape(-1)
    return x, y, model, mean, torch.kron(covariance.contiguous(), torch.eye(k))


def draws_through_pyro(guide, x, num_samples):
    """vec(W̃) of ``num_samples`` draws of the Pyro guide call (vectorised under a plate)."""
    with pyro.plate("draws", num_samples, dim=-1):
        trace = pyro.poutine.trace(guide).get_trace(x)
    weight, bias = trace.nodes["weight"]["value"], trace.nodes["bias"]["value"]
    matrix = torch.cat([weight, bias.unsqueeze(-1)], -1)
    return matrix.transpose(-1, -2).reshape(num_samples, -1)


def relative_error(estimate, reference):
    return ((estimate - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("split_damping", [False, True])
def test_elbo_exact_posterior_ignores_a_damping_as_large_as_the_fisher(float64, split_damping):
    """γ = 2 is the size of the Fisher's eigenvalues here (A ≈ I, G = I/σ² ≈ 2I): had γ entered Σ, the
    covariance would be about half the posterior's. It only damps the preconditioner."""
    x, y, model, mean, covariance = bayesian_linear_regression()
    guide = KroneckerNormal(model, damping=2.0, split_damping=split_damping)
    schedule = WarmupPolynomialLR(0.5, 0.5, total_steps=400, steps_per_epoch=1, warmup_steps=0, power=1.0)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.0, kl_clip=None, num_particles=50,
                    curvature=CurvatureConfig(fisher="mc", beta=0.02, inverse_every=1))
    for _ in range(400):
        engine.step(x, y)
    draws = draws_through_pyro(guide, x, 50_000)
    assert relative_error(draws.mean(0), mean) <= 0.02
    assert relative_error(torch.cov(draws.T), covariance) <= 0.05
    assert guide.damping == 2.0  # untouched: γ is the preconditioner's


def set_factors(guide, a, g):
    curvature = guide.blocks[0].curvature
    curvature.commit((a, g), curvature.decompose((a, g)))
    return curvature


def dense_covariance(guide, x, num_samples=200_000):
    return torch.cov(draws_through_pyro(guide, x, num_samples).T)


@pytest.mark.parametrize("split_damping", [False, True])
def test_the_two_scales_of_kronecker_normal(float64, split_damping):
    """ELBO-exact: Σ = (κ/N)(A ⊗ G + πI)⁻¹, π = κ/(Nη), whatever γ; the paper's mode: Σ = ρ²(F̂ + γI)⁻¹
    with the preconditioner's damped F̂ (eq. 12) — checked in closed form, in the dense matrix."""
    n, eta, kappa, gamma, rho = 50, 0.8, 0.5, 0.3, 0.2
    model = BayesianModel(nn.Linear(2, 2), Categorical(), eta, n)
    a, g = torch.randn(3, 3), torch.randn(2, 2)
    a, g = a @ a.T / 3, g @ g.T / 2
    fisher = torch.kron(a, g)
    exact = KroneckerNormal(model, kl_weight=kappa, damping=gamma, split_damping=split_damping)
    set_factors(exact, a, g)
    pi = kappa / (n * eta)
    expected = kappa / n * torch.linalg.inv(fisher + pi * torch.eye(6))
    assert exact.prior_precision == pytest.approx(pi)
    assert relative_error(dense_covariance(exact, torch.zeros(1, 2)), expected) <= 0.02

    paper = KroneckerNormal(model, rho=rho, damping=gamma, split_damping=split_damping)
    curvature = set_factors(paper, a, g)
    if split_damping:
        e_a, e_g = torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(g)
        factor = (e_a.mean() / e_g.mean()).sqrt()
        damped = torch.kron(a + factor * gamma**0.5 * torch.eye(3), g + gamma**0.5 / factor * torch.eye(2))
    else:
        damped = fisher + gamma * torch.eye(6)
    expected = rho**2 * torch.linalg.inv(damped)
    assert paper.prior_precision == 0.0
    assert relative_error(dense_covariance(paper, torch.zeros(1, 2)), expected) <= 0.02
    # the preconditioner of eq. (10) is the same damped F̂ for both scales (γ + π for the exact one)
    basis = torch.kron(curvature.eigenvectors_A, curvature.eigenvectors_G)
    preconditioner = basis @ torch.diag(paper.preconditioner()[0].T.reshape(-1)) @ basis.T
    assert torch.allclose(preconditioner, damped, atol=1e-10)


def small_model(width=3):
    return BayesianModel(nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)), Categorical(), 1.0, 100)


def test_a_guide_state_round_trips_with_its_damping():
    model = small_model()
    guide = KroneckerNormal(model, rho=0.1, damping=1e-3)
    engine = KFACVI(model, guide, lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    engine.step(x, y)
    guide.damping = 0.25  # as a retry leaves it
    fresh = KroneckerNormal(small_model(), rho=0.1, damping=1e-3)
    fresh.load_state_dict(guide.state_dict())
    assert fresh.damping == 0.25
    for mine, theirs in zip(guide.state_dict().values(), fresh.state_dict().values()):
        if torch.is_tensor(mine):
            assert torch.equal(mine, theirs)
    assert torch.equal(fresh.blocks[1].loc, guide.blocks[1].loc)


@pytest.mark.parametrize("other, message", [
    (lambda m: KroneckerDelta(m), "belongs to a KroneckerNormal, this guide is a KroneckerDelta"),
    (lambda m: KroneckerNormal(m, rho=0.2), "'rho': 0.1"),
    (lambda m: KroneckerNormal(m), "'rho': 0.1"),
    (lambda m: KroneckerNormal(m, rho=0.1, kl_weight=0.5), "'kl_weight': 1.0"),
    (lambda m: KroneckerNormal(m, rho=0.1, split_damping=True), "'split_damping': False"),
])
def test_a_state_does_not_load_into_another_family_or_configuration(other, message):
    state = KroneckerNormal(small_model(), rho=0.1).state_dict()
    target = other(small_model())
    before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(GuideStateError, match=message):
        target.load_state_dict(state)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_a_state_does_not_load_into_another_network():
    state = KroneckerNormal(small_model(3), rho=0.1).state_dict()
    with pytest.raises(GuideStateError, match="blocks"):
        KroneckerNormal(small_model(5), rho=0.1).load_state_dict(state)


def test_retries_grow_the_guides_damping_and_it_is_saved():
    model = small_model()
    guide = KroneckerNormal(model, rho=0.1, damping=1e-3)
    engine = KFACVI(model, guide, lr=0.1, on_nonfinite=Retry(max_retries=2, damping_growth=10.0))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    sums, calls = engine.estimator.sums, []

    def first_attempt_nonfinite(*args, **kwargs):
        stats = sums(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            stats.nll = stats.nll * float("nan")
        return stats

    engine.estimator.sums = first_attempt_nonfinite
    with pytest.warns(RuntimeWarning, match="Retrying"):
        engine.step(x, y)
    assert guide.damping == pytest.approx(1e-2)
    fresh = KroneckerNormal(small_model(), rho=0.1, damping=1e-3)
    fresh.load_state_dict(guide.state_dict())
    assert fresh.damping == pytest.approx(1e-2)
    assert "damping" not in engine.state_dict()


@pytest.mark.parametrize("split_damping", [False, True])
def test_a_laplace_posterior_from_a_kfac_solution_is_the_closed_form_posterior(float64, split_damping):
    """KroneckerNormal.from_guide around a KroneckerDelta holding the MAP and the exact Fisher
    (A = X̃ᵀX̃/N, G = I/σ² for a Gaussian likelihood) is Bayesian linear regression's posterior
    N(Λ⁻¹X̃ᵀy/σ², Λ⁻¹), Λ = X̃ᵀX̃/σ² + I/η, whatever the preconditioner's damping; the K-FAC guide is
    left as it was, and η is read when drawing (the calibration knob)."""
    x, y, model, mean, covariance = bayesian_linear_regression()
    n, sigma, k = x.shape[0], 0.7, y.shape[1]
    kfac = KroneckerDelta(model, damping=0.3, split_damping=split_damping)
    xt = torch.cat([x, torch.ones(n, 1)], 1)
    set_factors(kfac, xt.T @ xt / n, torch.eye(k) / sigma**2)
    kfac.blocks[0].eigenbasis_loc.copy_(kfac.blocks[0].curvature.to_eigenbasis(mean.reshape(-1, k).T))
    before = {key: value.clone() for key, value in kfac.state_dict().items() if torch.is_tensor(value)}

    laplace = KroneckerNormal.from_guide(kfac)
    draws = draws_through_pyro(laplace, x, 200_000)
    assert relative_error(draws.mean(0), mean) <= 0.01
    assert relative_error(torch.cov(draws.T), covariance) <= 0.02
    assert (laplace.damping, laplace.split_damping) == (0.3, split_damping)
    laplace.blocks[0].eigenbasis_loc.add_(1.0)  # a copy, not the K-FAC guide's buffer
    assert all(torch.equal(value, before[key]) for key, value in kfac.state_dict().items() if torch.is_tensor(value))

    model.prior_variance = 2.0 / 4  # a prior 4× as precise: Λ = X̃ᵀX̃/σ² + 4I/η
    narrower = torch.linalg.inv(xt.T @ xt / sigma**2 + 4 * torch.eye(x.shape[1] + 1) / 2.0)
    assert relative_error(torch.cov(draws_through_pyro(laplace, x, 200_000).T), torch.kron(narrower.contiguous(), torch.eye(k))) <= 0.02


def test_the_prior_variance_can_be_set_and_is_saved_when_learned():
    fixed = BayesianModel(nn.Linear(2, 2), Categorical(), 1.0, 10)
    fixed.prior_variance = 0.25
    assert fixed.prior_variance == 0.25
    with pytest.raises(ValueError, match="positive and finite"):
        fixed.prior_variance = float("nan")
    learned = BayesianModel(nn.Linear(2, 2), Categorical(), "auto", 10)
    learned.prior_variance = 0.25
    twin = BayesianModel(nn.Linear(2, 2), Categorical(), "auto", 10)
    twin.load_state_dict(learned.state_dict())
    assert twin.prior_variance == 0.25
