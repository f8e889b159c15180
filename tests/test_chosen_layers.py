"""Partly Bayesian networks: frozen parameters stay as they are, ``bayesian=`` chooses the layers
with a posterior distribution, the others are point masses trained by the same engine."""
import pyro
import pytest
import torch
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerNormal,
                         WarmupPolynomialLR)


def relative_error(estimate, reference):
    return ((estimate - reference).norm() / reference.norm()).item()


def test_a_bayesian_last_layer_on_frozen_features_is_bayesian_linear_regression(float64):
    """Closed form on the features φ(x) of a frozen random extractor: rows of W̃ independent, each
    N(Λ⁻¹ Φ̃ᵀ y / σ², Λ⁻¹) with Λ = Φ̃ᵀΦ̃/σ² + I/η; the extractor's parameters do not move."""
    n, sigma, eta = 300, 0.3, 1.5
    net = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 2))
    net[0].requires_grad_(False)
    frozen = [p.clone() for p in net[0].parameters()]
    x = torch.randn(n, 4)
    with torch.no_grad():
        features = torch.cat([net[1](net[0](x)), torch.ones(n, 1)], 1)
    y = features @ torch.randn(13, 2) + sigma * torch.randn(n, 2)
    model = BayesianModel(net, Gaussian(sigma), eta, n)
    assert list(model.weight_sites()) == ["2.weight", "2.bias"]
    guide = KroneckerNormal(model, damping=1e-3)
    schedule = WarmupPolynomialLR(0.5, 0.5, total_steps=400, steps_per_epoch=1, warmup_steps=0, power=1.0)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.0, kl_clip=None, num_particles=50,
                    curvature=CurvatureConfig(fisher="mc", beta=0.02, inverse_every=1))
    for _ in range(400):
        engine.step(x, y)

    precision = features.T @ features / sigma**2 + torch.eye(13) / eta
    covariance = torch.linalg.inv(precision)
    mean = (covariance @ features.T @ y / sigma**2).reshape(-1)  # column-major vec of W̃
    with pyro.plate("draws", 50_000, dim=-1):
        trace = pyro.poutine.trace(guide).get_trace(x)
    matrix = torch.cat([trace.nodes["2.weight"]["value"], trace.nodes["2.bias"]["value"].unsqueeze(-1)], -1)
    draws = matrix.transpose(-1, -2).reshape(50_000, -1)
    assert relative_error(draws.mean(0), mean) <= 0.03
    assert relative_error(torch.cov(draws.T), torch.kron(covariance.contiguous(), torch.eye(2))) <= 0.08
    assert all(torch.equal(p, q) for p, q in zip(net[0].parameters(), frozen))


def two_layer_model(bayesian):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return BayesianModel(net, Categorical(), 0.7, 100, bayesian=bayesian)


@pytest.mark.parametrize("bayesian", [["2"], lambda name, module: module.out_features == 2])
def test_layers_not_chosen_are_point_masses_with_a_map_prior_term(float64, bayesian):
    model = two_layer_model(bayesian)
    assert model.bayesian_layers == ["2"]
    guide = KroneckerNormal(model, rho=0.3)
    engine = KFACVI(model, guide)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    for _ in range(3):
        engine.step(x, y)
    point, gaussian = guide.sample_blocks(5)
    assert all(torch.equal(point[0], draw) for draw in point)  # the first layer: its mean, always
    torch.testing.assert_close(point[0], guide.blocks[0].loc)
    assert not torch.equal(gaussian[0], gaussian[1])
    # KL of the Bayesian block (dense reference) + −log p(μ_P) of the point block
    q = guide.distributions()[1]
    basis = torch.kron(guide.blocks[1].curvature.eigenvectors_A, guide.blocks[1].curvature.eigenvectors_G)
    dense = torch.distributions.MultivariateNormal(
        q.loc.T.reshape(-1), basis @ torch.diag((q.scale**2).T.reshape(-1)) @ basis.T)
    kl = torch.distributions.kl_divergence(dense, torch.distributions.MultivariateNormal(
        torch.zeros(12), 0.7 * torch.eye(12)))
    map_prior = -torch.distributions.Normal(0.0, 0.7**0.5).log_prob(guide.blocks[0].loc).sum()
    torch.testing.assert_close(guide.kl_to_prior(), kl + map_prior)
    assert isinstance(guide.distributions()[0], pyro.distributions.Delta)


def test_a_state_does_not_load_into_a_guide_with_other_bayesian_layers():
    from pyro_kfacvi.guides import GuideStateError

    state = KroneckerNormal(two_layer_model(["2"]), rho=0.3).state_dict()
    with pytest.raises(GuideStateError, match="blocks"):
        KroneckerNormal(two_layer_model(None), rho=0.3).load_state_dict(state)
    KroneckerNormal(two_layer_model(["2"]), rho=0.3).load_state_dict(state)


def test_bayesian_names_must_be_layers_with_trainable_parameters():
    with pytest.raises(ValueError, match=r"bayesian names \['fc9'\].*choose from \['0', '2'\]"):
        two_layer_model(["fc9"])


def test_frozen_and_trainable_parameters_in_one_layer_are_refused():
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen and trainable parameters"):
        BayesianModel(net, Categorical(), 1.0, 10)


def test_a_frozen_layer_of_any_type_runs_as_it_is():
    """A frozen LayerNorm (no adapter) and a frozen BatchNorm stay in the network; only the last
    layer gets sites."""
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for module in net[:3]:
        module.requires_grad_(False)
    model = BayesianModel(net, Categorical(), 1.0, 50)
    assert list(model.weight_sites()) == ["3.weight", "3.bias"]
    guide = KroneckerNormal(model)
    engine = KFACVI(model, guide, num_particles=3)
    before = [p.clone() for p in net[:3].parameters()]
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _ in range(3):
        engine.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(net[:3].parameters(), before))
    net.eval()
    with torch.no_grad():
        expected = net[2](net[1](net[0](x)))
    out = model.output(x, {site: value.unsqueeze(0) for site, value in
                           zip(model.weight_sites(), guide.blocks[0].split(guide.blocks[0].loc).values())})
    torch.testing.assert_close(out.squeeze(0), expected @ guide.blocks[0].loc[:, :4].T + guide.blocks[0].loc[:, 4])
