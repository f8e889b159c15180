"""The model/guide contract with Pyro: matching sites, pyro.infer.Predictive, Trace_ELBO."""
import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, Gaussian, KroneckerNormal, Predictive
from pyro_kfacvi.layers import run_sampled


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.fixture
def trained():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    model = BayesianModel(Net(), Categorical(), 1.0, 100)
    guide = KroneckerNormal(model, kl_weight=1.0)
    engine = KFACVI(model, guide, lr=0.05, num_particles=4)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for _ in range(20):
        engine.step(x, y)
    return model, guide, engine, x, y


def weight_sites(trace):
    return {name: site["value"].shape for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")
            and not site_is_subsample(site)}


def test_model_and_guide_have_matching_weight_sites(trained):
    model, guide, _, x, y = trained
    model_sites = weight_sites(poutine.trace(model).get_trace(x, y))
    guide_sites = weight_sites(poutine.trace(guide).get_trace(x, y))
    assert model_sites == guide_sites
    assert set(model_sites) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    assert model_sites["conv.weight"] == (2, 1, 3, 3)


def test_likelihood_is_scaled_to_the_dataset(trained):
    model, _, _, x, y = trained
    trace = poutine.trace(model).get_trace(x, y)
    trace.compute_log_prob()
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(100 / 16)
    torch.testing.assert_close(obs["log_prob_sum"], obs["fn"].log_prob(y).sum() * 100 / 16)


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive_agrees_with_pyro_predictive(trained, parallel):
    model, guide, _, x, _ = trained
    model.eval()
    num = 4000
    ours = Predictive(model, guide, num).samples(x)
    pyro_outputs = pyro.infer.Predictive(model, guide=guide, num_samples=num, parallel=parallel,
                                         return_sites=["output"])(x)["output"].reshape(num, 16, 3)
    theirs = pyro_outputs.softmax(-1)
    stderr = (theirs.std(0) ** 2 / num + ours.std(0) ** 2 / num).sqrt()
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 5 * stderr + 1e-6).all()
    # the same weights give the same outputs: condition the model on our guide's draws
    trace = poutine.trace(guide).get_trace(x)
    conditioned = poutine.trace(poutine.condition(model, trace)).get_trace(x)
    draws = [trace.nodes[b.aux_site]["value"].unsqueeze(0) for b in guide.blocks]
    direct = run_sampled(model.net, model.layers, guide.layer_params(draws), x, 1)[0]
    torch.testing.assert_close(conditioned.nodes["output"]["value"], direct)


def test_predictive_outputs_do_not_depend_on_the_pass_shape(trained):
    """Rows and samples per batched pass (the defaults, one at a time, uneven splits) give the same outputs."""
    model, guide, _, x, _ = trained
    outputs = []
    for chunk_size, batch_size in [(None, None), (1, 1), (3, 5), (7, 16)]:
        pyro.set_rng_seed(0)
        outputs.append(Predictive(model, guide, 7, chunk_size=chunk_size, batch_size=batch_size).outputs(x))
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0])


def test_trace_elbo_matches_the_engine_loss(trained):
    """Pyro's Monte Carlo ELBO (log q by our density) agrees with the engine's analytic-KL loss."""
    model, guide, engine, x, y = trained
    model.eval()
    elbo = pyro.infer.Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    pyro_loss = elbo.loss(model, guide, x, y) / model.num_data
    engine.num_particles = 2000
    ours = engine.evaluate_loss(x, y)
    assert pyro_loss == pytest.approx(ours, rel=0.02)


def test_gaussian_predictive_mean_and_variance():
    torch.manual_seed(1)
    model = BayesianModel(nn.Linear(2, 1), Gaussian(0.3), 1.0, 50)
    guide = KroneckerNormal(model, rho=0.2, damping=1.0)
    x = torch.randn(5, 2)
    prediction = Predictive(model, guide, 20000)(x)
    # with A = G = I, Σ = ρ²/(1+γ) I: f = w·x + b has variance ρ²/(1+γ)(|x|² + 1)
    expected_epistemic = 0.2**2 / 2 * (x.pow(2).sum(1, keepdim=True) + 1)
    torch.testing.assert_close(prediction.mean, model.net(x).detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(prediction.epistemic, expected_epistemic, rtol=0.05, atol=0)
    torch.testing.assert_close(prediction.aleatoric, torch.full((5, 1), 0.3**2))
    torch.testing.assert_close(prediction.variance, expected_epistemic + 0.3**2, rtol=0.05, atol=0)
