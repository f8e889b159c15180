"""pyro_kfacvi.save / load: a trained model, guide and engine with their configuration, loaded into
a fresh process, give the identical predictive and continue training identically."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_kfacvi import (KFACVI, BayesianModel, CurvatureConfig, Gaussian, KroneckerDelta, KroneckerNormal,
                         Predictive, Retry, WarmupPolynomialLR, load, save)

pytestmark = pytest.mark.usefixtures("one_thread")  # the same float sums in this process and the child


def make_net(seed):
    """The architecture (a BatchNorm too, for buffers in the model's state), initialised by ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 2))


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=generator)
    return x, torch.stack([x[:, 0].sin(), x[:, 1] * x[:, 2]], 1) + 0.1 * torch.randn(64, 2, generator=generator)


def predict_then_step(model, guide, engine):
    """The predictive under seed 7, then one more step under seed 8: what a fresh process must reproduce."""
    x, y = data()
    torch.manual_seed(7)
    prediction = Predictive(model, guide, 16)(x[:10])
    torch.manual_seed(8)
    loss = engine.step(x, y)
    return {"prediction": list(prediction), "loss": loss, "guide": guide.state_dict(), "model": model.state_dict(),
            "engine": engine.state_dict()}


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from pyro_kfacvi import load, WarmupPolynomialLR
from test_io import make_net, predict_then_step
torch.set_num_threads(1)
model, guide, engine = load({path!r}, make_net(seed=123))
facts = {{"eta": model.prior_variance, "sigma": model.likelihood.scale, "iteration": engine.iteration,
          "lr": vars(engine.lr), "momentum": engine.momentum, "retry": engine.retry.max_retries,
          "beta": engine.curvature.beta, "kl_weight": guide.kl_weight, "damping": guide.damping}}
torch.save({{**predict_then_step(model, guide, engine), "facts": facts}}, {out!r})
"""


def test_a_fresh_process_loads_an_identical_posterior_and_engine(tmp_path):
    model = BayesianModel(make_net(seed=0), Gaussian(), "auto", 64)
    guide = KroneckerNormal(model, kl_weight=0.5, damping=1e-2)
    schedule = WarmupPolynomialLR(0.01, 0.1, total_steps=20, steps_per_epoch=1, warmup_steps=3)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.5, num_particles=2, on_nonfinite=Retry(max_retries=2),
                    curvature=CurvatureConfig(fisher="mc", beta=0.2, inverse_every=2))
    x, y = data()
    for _ in range(5):
        engine.step(x, y)
    guide.damping = 0.02  # as a retry leaves it
    save(tmp_path / "posterior.pt", model, guide, engine)
    facts = {"eta": model.prior_variance, "sigma": model.likelihood.scale, "iteration": 5, "lr": vars(schedule),
             "momentum": 0.5, "retry": 2, "beta": 0.2, "kl_weight": 0.5, "damping": 0.02}

    code = CHILD.format(tests=str(Path(__file__).parent), path=str(tmp_path / "posterior.pt"),
                        out=str(tmp_path / "child.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    child = torch.load(tmp_path / "child.pt", weights_only=False)
    here = predict_then_step(model, guide, engine)

    assert child["facts"]["eta"] == facts["eta"] != 1.0
    assert torch.equal(child["facts"]["sigma"], facts["sigma"]) and float(facts["sigma"]) != 1.0
    assert {k: v for k, v in child["facts"].items() if k not in ("eta", "sigma")} == {
        k: v for k, v in facts.items() if k not in ("eta", "sigma")}
    for a, b in zip(child["prediction"], here["prediction"], strict=True):  # mean, variance, epistemic, aleatoric
        assert torch.equal(a, b)
    assert child["loss"] == here["loss"]
    for name in ("guide", "model"):
        assert child[name].keys() == here[name].keys()
        for key, value in here[name].items():
            assert torch.equal(child[name][key], value) if torch.is_tensor(value) else child[name][key] == value
    assert child["engine"]["iteration"] == here["engine"]["iteration"] == 6
    for a, b in zip(child["engine"]["velocities"], here["engine"]["velocities"], strict=True):
        assert torch.equal(a, b)


def test_load_takes_the_saved_dtype_and_the_callers_schedule(tmp_path):
    model = BayesianModel(make_net(seed=0).double(), Gaussian(0.3), 2.0, 64)
    guide = KroneckerDelta(model)
    engine = KFACVI(model, guide, lr=lambda t: 0.1 / (1 + t))
    x, y = data()
    engine.step(x.double(), y.double())
    save(tmp_path / "map.pt", model, guide, engine)
    with pytest.raises(ValueError, match="schedule of type test_load_takes.*<locals>.<lambda>.*pass it to load"):
        load(tmp_path / "map.pt", make_net(seed=1))
    loaded, loaded_guide, loaded_engine = load(tmp_path / "map.pt", make_net(seed=1), lr=0.05)
    assert loaded.net[0].weight.dtype == torch.float64 and loaded.prior_variance == 2.0
    assert loaded.likelihood.scale == 0.3 and isinstance(loaded_guide, KroneckerDelta)
    assert loaded_engine.lr == 0.05 and loaded_engine.iteration == 1
    assert torch.equal(loaded_guide.blocks[0].loc, guide.blocks[0].loc)
    save(tmp_path / "posterior.pt", model, guide)
    _, guide_only, no_engine = load(tmp_path / "posterior.pt", make_net(seed=1))
    assert no_engine is None and torch.equal(guide_only.blocks[1].loc, guide.blocks[1].loc)


def test_load_refuses_other_files_and_architectures(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by pyro_kfacvi.save"):
        load(tmp_path / "other.pt", make_net(seed=0))
    model = BayesianModel(make_net(seed=0), Gaussian(), 1.0, 64)
    save(tmp_path / "posterior.pt", model, KroneckerNormal(model))
    wider = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.BatchNorm1d(9), nn.Linear(9, 2))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load(tmp_path / "posterior.pt", wider)
