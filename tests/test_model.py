"""BayesianModel construction and input checks, and the learning-rate schedule."""
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerDelta,
                         KroneckerNormal, WarmupPolynomialLR)


class BareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("net,match", [
    (nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2)), r"layer '1' of type LSTM"),
    (BareParameter(), r"the network itself of type BareParameter owns parameters \['scale'\]"),
    (nn.Sequential(nn.Embedding(3, 2)), "Embedding"),
])
def test_unsupported_layers_are_named(net, match):
    with pytest.raises(TypeError, match=match):
        BayesianModel(net, Categorical(), 1.0, 10)


def test_unsupported_conv_configurations():
    with pytest.raises(ValueError, match="groups=2"):
        BayesianModel(nn.Conv2d(2, 2, 3, groups=2), Categorical(), 1.0, 10)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        BayesianModel(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), Categorical(), 1.0, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"prior_variance": 0.0}, "prior_variance"), ({"prior_variance": -1.0}, "prior_variance"),
    ({"num_data": 0}, "num_data"), ({"num_data": 2.5}, "num_data"),
])
def test_bad_model_arguments(kwargs, match):
    args = {"prior_variance": 1.0, "num_data": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesianModel(nn.Linear(2, 2), Categorical(), **args)


def test_bad_batches_are_rejected_before_any_state_changes():
    model = BayesianModel(nn.Linear(2, 3), Categorical(), 1.0, 10)
    guide = KroneckerNormal(model, rho=0.1)
    engine = KFACVI(model, guide, lr=0.1)
    state = {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    for bad_x, bad_y, error, match in [
        (x, y[:3], ValueError, "different numbers of examples"),
        (x[:0], y[:0], ValueError, "non-empty"),
        (x, y.float(), TypeError, "integer"),
        (x.long(), y, TypeError, "floating-point"),
        (torch.randn(11, 2), torch.zeros(11, dtype=torch.long), ValueError, "larger than num_data"),
    ]:
        with pytest.raises(error, match=match):
            engine.step(bad_x, bad_y)
    assert all(torch.equal(v, state[k]) for k, v in guide.state_dict().items() if torch.is_tensor(v))
    with pytest.raises(ValueError, match="guide was built for a different model"):
        KFACVI(BayesianModel(nn.Linear(2, 3), Categorical(), 1.0, 10), guide, lr=0.1)
    with pytest.raises(ValueError, match="num_particles=2 draws 2 identical samples"):
        KFACVI(model, KroneckerDelta(model), lr=0.1, num_particles=2)
    with pytest.raises(ValueError, match="damping"):
        KroneckerNormal(model, damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        KroneckerDelta(model, damping=-1.0)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        KFACVI(model, guide, lr=0.1, curvature=CurvatureConfig(beta=0.0))


def test_pyro_svi_with_vectorized_particles_runs_on_the_model():
    """What a Pyro user would do instead: mean-field SVI on the same model, particles vectorised."""
    pyro.clear_param_store()
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    model = BayesianModel(net, Categorical(), 1.0, 100)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=5, vectorize_particles=True))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 2, (6,))
    losses = [svi.step(x, y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the vectorised output has one row of logits per particle
    with pyro.plate("particles", 5, dim=-2):
        trace = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x, y))).get_trace(x, y)
    assert trace.nodes["output"]["value"].shape == (5, 6, 2)


def test_schedule_matches_equations_13_14_and_6():
    s = WarmupPolynomialLR(initial_lr=1e-3, base_lr=1e-2, total_steps=3000, steps_per_epoch=500, warmup_steps=1000, power=2.0)
    assert s(0) == pytest.approx(1e-3)
    assert s(500) == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert s(1000) == pytest.approx(1e-2)
    assert s(2000) == pytest.approx(1e-2 * (1 - 1000 / 2500) ** 2)
    assert s(2999) == pytest.approx(1e-2 * (1 - 1999 / 2500) ** 2)
    assert s.momentum_scale(2000) == pytest.approx((1 - 1000 / 2500) ** 2)
    engine = KFACVI(*_linear_pair(), lr=s, momentum=0.9)
    assert engine.hyperparameters(2000) == pytest.approx((s(2000), 0.9 * s(2000) / 1e-2))


def _linear_pair():
    model = BayesianModel(nn.Linear(2, 1), Gaussian(1.0), 1.0, 10)
    return model, KroneckerNormal(model)
