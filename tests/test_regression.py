"""Regression: the learned noise σ and the empirical-Bayes prior variance η against the true noise,
the ELBO's optimum and the evidence of Bayesian linear regression in closed form; checked
targets; the Gaussian predictive; Predictive with other Pyro guides; SVI with a Kronecker guide."""
import math
import warnings

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, GaussianPrediction,
                         KroneckerDelta, KroneckerNormal, Predictive, WarmupPolynomialLR)
from pyro_kfacvi.distributed import Communicator, ParallelPlan
from pyro_kfacvi.layers import run_sampled


def linear_data(n, d=6, k=3, sigma=0.7, weight_scale=1.0):
    """y = W x + b + N(0, σ²I), x ~ N(0, I), W and b ~ N(0, weight_scale²)."""
    x = torch.randn(n, d)
    y = x @ (weight_scale * torch.randn(k, d)).T + weight_scale * torch.randn(k) + sigma * torch.randn(n, k)
    return x, y


def elbo_exact_engine(model, steps, num_particles=50):
    """The MC Fisher and a decaying learning rate: q converges to the exact posterior of a
    linear-Gaussian model (tests/test_guides.py)."""
    guide = KroneckerNormal(model)
    schedule = WarmupPolynomialLR(0.5, 0.5, total_steps=steps, steps_per_epoch=1, warmup_steps=0, power=1.0)
    return KFACVI(model, guide, lr=schedule, momentum=0.0, kl_clip=None, num_particles=num_particles,
                  curvature=CurvatureConfig(fisher="mc", beta=0.1, inverse_every=1))


def log_evidence(x, y, noise_variance, eta):
    r"""log p(Y | σ², η) of Bayesian linear regression, y_j = X̃ w_j + ε per output j, w_j ~ N(0, ηI):
    Σ_j log N(y_j; 0, σ²I + ηX̃X̃ᵀ), in closed form from the eigenvalues λ of X̃ᵀX̃ = V Λ Vᵀ:
    log|σ²I + ηX̃X̃ᵀ| = (N − r) log σ² + Σ_i log(σ² + ηλ_i) and, with B = Vᵀ X̃ᵀ Y (Woodbury),
    Σ_j y_jᵀ(σ²I + ηX̃X̃ᵀ)⁻¹y_j = (‖Y‖² − Σ_ij η B_ij² / (σ² + ηλ_i)) / σ²."""
    xt = torch.cat([x, torch.ones(len(x), 1)], 1)
    (n, r), k = xt.shape, y.shape[1]
    lam, v = torch.linalg.eigh(xt.T @ xt)
    b = v.T @ xt.T @ y
    log_det = (n - r) * math.log(noise_variance) + torch.log(noise_variance + eta * lam).sum()
    quadratic = (y.pow(2).sum() - (eta * b.pow(2) / (noise_variance + eta * lam)[:, None]).sum()) / noise_variance
    return (-0.5 * (k * n * math.log(2 * math.pi) + k * log_det + quadratic)).item()


def argmax(f, low, high, iterations=60):
    """The maximiser of a unimodal f on [low, high], by golden-section search over log x."""
    ratio, a, b = (math.sqrt(5) - 1) / 2, math.log(low), math.log(high)
    for _ in range(iterations):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        a, b = (a, d) if f(math.exp(c)) > f(math.exp(d)) else (c, b)
    return math.exp((a + b) / 2)


def test_log_evidence_in_closed_form_equals_the_dense_gaussian(float64):
    x, y = linear_data(12)
    xt = torch.cat([x, torch.ones(12, 1)], 1)
    dense = torch.distributions.MultivariateNormal(torch.zeros(12), 0.3 * torch.eye(12) + 0.8 * xt @ xt.T)
    assert log_evidence(x, y, 0.3, 0.8) == pytest.approx(dense.log_prob(y.T).sum().item(), rel=1e-12)


@pytest.mark.parametrize("learn_noise", [False, True])
def test_empirical_bayes_prior_is_the_evidence_maximiser(float64, learn_noise):
    """On Bayesian linear regression the ELBO-exact q is the exact posterior, so η ← (‖μ‖² + tr Σ)/P
    (and σ² ← E_q[residual²]) is EM for the evidence: it must reach the closed-form maximiser. N = 20
    keeps tr Σ a quarter of η or more, so that dropping it (or ‖μ‖²) misses by far more than 5%."""
    x, y = linear_data(20, weight_scale=0.3)
    # 200 steps: a shorter memory for the learned σ than the default's 100 steps
    model = BayesianModel(nn.Linear(6, 3), Gaussian(rate=0.1) if learn_noise else Gaussian(0.7), "auto", 20)
    engine = elbo_exact_engine(model, steps=200)
    for _ in range(200):
        engine.step(x, y)

    if learn_noise:  # maximise over σ² for each η, then over η
        best_noise = lambda eta: argmax(lambda s: log_evidence(x, y, s, eta), 1e-3, 1e3)
        eta = argmax(lambda e: log_evidence(x, y, best_noise(e), e), 1e-4, 1e3)
        noise_variance = best_noise(eta)
        assert float(model.likelihood.scale) == pytest.approx(math.sqrt(noise_variance), rel=0.02)
    else:
        eta = argmax(lambda e: log_evidence(x, y, 0.49, e), 1e-4, 1e3)
    assert model.prior_variance == pytest.approx(eta, rel=0.05)
    trace_share = engine.guide.covariance_trace().item() / engine.guide.second_moment().item()
    assert trace_share > 0.2  # the test could tell tr Σ missing


def test_learned_noise_converges_to_the_true_noise(float64):
    """Minibatches of 500 from 4,000 examples of known noise σ = 0.5, 100 epochs, the default
    smoothing (init_scale 0.1, rate 0.01): the learned σ within 10% of it, and σ² within 3% of the
    ELBO's optimum E_q[(1/(ND)) Σ_n ‖y_n − f(x_n, θ)‖²] at the final q (draws through the Pyro guide
    over all the data)."""
    x, y = linear_data(4000, d=5, k=2, sigma=0.5)
    model = BayesianModel(nn.Linear(5, 2), Gaussian(), 1.0, 4000)
    guide = KroneckerNormal(model)
    schedule = WarmupPolynomialLR(0.3, 0.3, total_steps=800, steps_per_epoch=8, warmup_steps=0, power=1.0)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.0, kl_clip=None, num_particles=4,
                    curvature=CurvatureConfig(fisher="mc", beta=0.1))
    assert float(model.likelihood.scale) == pytest.approx(0.1)  # init_scale until the first step
    for step in range(800):
        batch = torch.arange(500) + 500 * (step % 8)
        engine.step(x[batch], y[batch])

    learned = model.likelihood.scale
    assert torch.is_tensor(learned) and learned.dim() == 0
    assert float(learned) == pytest.approx(0.5, rel=0.1)
    with pyro.plate("draws", 2000, dim=-2):
        trace = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x))).get_trace(x)
    optimum = (trace.nodes["output"]["value"] - y).pow(2).mean()
    assert float(learned) ** 2 == pytest.approx(optimum.item(), rel=0.03)


def test_learned_values_round_trip_through_the_models_state(float64):
    x, y = linear_data(40, d=2, k=1)
    model = BayesianModel(nn.Linear(2, 1), Gaussian(), "auto", 40)
    engine = KFACVI(model, KroneckerNormal(model), lr=0.1, num_particles=2)
    for _ in range(3):
        engine.step(x, y)
    fresh = BayesianModel(nn.Linear(2, 1), Gaussian(), "auto", 40)
    fresh.load_state_dict(model.state_dict())
    assert fresh.prior_variance == model.prior_variance != 1.0
    assert torch.equal(fresh.likelihood.scale, model.likelihood.scale)
    assert float(fresh.likelihood.scale) != 0.1  # learned, not the initial value
    with pytest.raises(RuntimeError, match="learned_prior_variance"):  # a fixed η is configuration, not state
        BayesianModel(nn.Linear(2, 1), Gaussian(), 1.0, 40).load_state_dict(model.state_dict())


def test_noise_moving_average():
    """σ²_t = σ²_{t−1} + r (s_t − σ²_{t−1}) from σ_0 = init_scale."""
    likelihood = Gaussian(init_scale=0.5, rate=0.25)
    expected = 0.25
    for s in [4.0, 2.0, 3.0]:
        likelihood.update((torch.tensor(s),))
        expected += 0.25 * (s - expected)
    assert likelihood.variance.item() == pytest.approx(expected)
    assert Gaussian(0.3).scale == 0.3 and Gaussian(0.3).statistics(torch.zeros(2, 1), torch.ones(2, 1)) == ()


def test_prior_auto_with_a_point_mass_warns_that_it_changes_only_the_loss():
    model = BayesianModel(nn.Linear(2, 1), Gaussian(0.5), "auto", 10)
    engine = KFACVI(model, KroneckerDelta(model), lr=0.1)
    with pytest.warns(UserWarning, match="KroneckerDelta does not use η"):
        engine.step(torch.randn(4, 2), torch.randn(4, 1))
    expected = engine.guide.mean_squared_norm().item() / 3  # tr Σ = 0
    assert model.prior_variance == pytest.approx(expected)


@pytest.mark.parametrize("value", ["automatic", 0.0, float("inf")])
def test_bad_prior_variance(value):
    with pytest.raises(ValueError, match="prior_variance must be"):
        BayesianModel(nn.Linear(2, 1), Gaussian(0.5), value, 10)


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": float("nan")}, {"init_scale": -1.0}, {"rate": 0.0}])
def test_bad_noise_arguments(kwargs):
    with pytest.raises(ValueError):
        Gaussian(**kwargs)


# --------------------------------------------------------------------------------------------
# targets and inputs
def regression_engine():
    model = BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), Gaussian(), 1.0, 100)
    guide = KroneckerNormal(model)
    return model, guide, KFACVI(model, guide, lr=0.1)


@pytest.mark.parametrize("y, error, match", [
    (torch.randn(16, 2), ValueError, r"network output's shape per example: the network gives \(1,\) per example, "
                                     r"y has shape \(16, 2\); pass targets of shape \(16, 1\)$"),
    (torch.randn(16), ValueError, r"y has shape \(16,\); pass targets of shape \(16, 1\) \(y.unsqueeze\(-1\)"),
    (torch.randn(16, 1, 1), ValueError, r"y has shape \(16, 1, 1\)"),
    (torch.ones(16, 1, dtype=torch.long), TypeError, "Gaussian targets must be a floating-point tensor"),
])
def test_gaussian_targets_must_have_the_output_shape(y, error, match):
    model, guide, engine = regression_engine()
    before = {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(error, match=match):
        engine.step(torch.randn(16, 3), y)
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in before.items())
    assert engine.iteration == 0


def test_nonfinite_targets_are_named_in_regression_words():
    _, _, engine = regression_engine()
    y = torch.randn(16, 1)
    y[[3, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"^y holds 2 targets outside the finite real numbers \(the first at index "
                                         r"3: \[nan\]\); repair or drop those examples$"):
        engine.step(torch.randn(16, 3), y)


def test_gaussian_needs_an_output_of_shape_batch_by_d():
    model = BayesianModel(nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), Gaussian(), 1.0, 100)
    with pytest.raises(ValueError, match=r"needs a network output of shape \(batch, D\); this network gives \(\)"):
        model.check_batch(torch.randn(4, 3), torch.randn(4))


@pytest.mark.parametrize("guide_of", [KroneckerNormal, AutoNormal])
def test_predictive_rejects_nonfinite_inputs_as_step_does(guide_of):
    model, _, _ = regression_engine()
    guide = guide_of(model)
    if guide_of is AutoNormal:
        guide(torch.randn(4, 3), torch.randn(4, 1))  # sets it up
    x = torch.randn(8, 3)
    x[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"x holds NaN or Inf in 1 of its 8 examples \(the first at index 5\)"):
        Predictive(model, guide, 4)(x)
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        Predictive(model, guide, 4)(torch.randn(8, 2))


# --------------------------------------------------------------------------------------------
# the predictive with other guides
def test_gaussian_prediction_with_an_autonormal_guide(float64):
    """A mean-field q(w, b) = N(m, diag(s²)) of a linear model: the predictive mean m·x + m_b and the
    epistemic variance Σ_j x_j² s_j² + s_b², in closed form."""
    pyro.clear_param_store()
    model = BayesianModel(nn.Linear(2, 1), Gaussian(0.3), 1.0, 50)
    guide = AutoNormal(model, init_scale=0.2)
    x, y = torch.randn(50, 2), torch.randn(50, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AutoNormal has Pyro parameters: no warning
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(20):
            svi.step(x, y)
    prediction = Predictive(model, guide, 5000)(x[:5])  # one guide trace per sample: 0.4 ms each
    assert isinstance(prediction, GaussianPrediction)
    mean = x[:5] @ guide.locs.weight.detach().T + guide.locs.bias.detach()
    epistemic = x[:5].pow(2) @ guide.scales.weight.detach().pow(2).T + guide.scales.bias.detach().pow(2)
    torch.testing.assert_close(prediction.mean, mean, atol=0.02, rtol=0)  # 4 standard errors
    torch.testing.assert_close(prediction.epistemic, epistemic, rtol=0.08, atol=0)  # 4 standard errors
    torch.testing.assert_close(prediction.variance, prediction.epistemic + 0.09)
    torch.testing.assert_close(prediction.aleatoric, torch.full((5, 1), 0.09))


def test_categorical_prediction_with_an_autodelta_guide_is_the_point_estimate():
    pyro.clear_param_store()
    model = BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)), Categorical(), 1.0, 20)
    guide = AutoDelta(model)
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    guide(x, y)
    probs = Predictive(model, guide, 3)(x)
    weights = {name: value.detach() for name, value in guide.median(x).items()}
    torch.testing.assert_close(probs, model.output(x, weights).softmax(-1))


def test_predictive_names_a_guide_without_the_weight_sites():
    model, _, _ = regression_engine()

    def other_guide(x):
        pyro.sample("something else", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match=r"draws no value for the model's weight sites \['0.weight', '0.bias'"):
        Predictive(model, other_guide, 2)(torch.randn(4, 3))


# --------------------------------------------------------------------------------------------
# Pyro's SVI with a Kronecker guide
def test_svi_with_a_kronecker_guide_warns_once_and_points_at_kfacvi():
    model, guide, _ = regression_engine()
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro.poutine.trace(guide).get_trace(x)
        pyro.infer.Predictive(model, guide=guide, num_samples=2)(x)
        Trace_ELBO().loss(model, guide, x, y)
    assert not caught
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    before = [mean.clone() for mean in guide.means()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            svi.step(x, y)
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert "trains nothing with a KroneckerNormal" in str(caught[0].message)
    assert "pyro_kfacvi.KFACVI(model, guide, lr=...).step(x, y)" in str(caught[0].message)
    assert all(torch.equal(a, b) for a, b in zip(before, guide.means()))  # indeed nothing trained


def test_the_residual_statistic_is_summed_over_ranks_and_averaged():
    """The statistic σ is learned from is the mean squared residual of the step's sampled networks,
    and it is summed over ranks with the gradients: two ranks holding the same partial sums give it
    back after the all-reduce and the division by twice the count."""
    model, guide, engine = regression_engine()
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    draws = guide.sample_eigenbasis_blocks(3)
    weights = [block.curvature.from_eigenbasis(draw) for block, draw in zip(guide.blocks, draws)]
    outputs = run_sampled(model.net, model.layers, guide.layer_params(weights), x, 3)
    sums = engine.estimator.sums(model, guide, x, y, draws)

    class TwoIdenticalRanks(Communicator):
        def all_reduce_sum(self, tensors):
            return [2 * t for t in tensors]

    summed = ParallelPlan("samples", communicator=TwoIdenticalRanks()).sum_statistics(sums)
    assert summed.count == 2 * sums.count
    per_pair = sums.means_()  # in place: after the all-reduce has read the sums
    torch.testing.assert_close(per_pair.likelihood_stats[0], (outputs - y).pow(2).mean())
    torch.testing.assert_close(summed.means_().likelihood_stats[0], per_pair.likelihood_stats[0])
