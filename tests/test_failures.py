"""A step that fails anywhere changes nothing: the guide, the engine, the network's buffers and
mode and the RNG state are bit-identical to before the step, and the error names the cause."""
import pytest
import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal, Retry
from pyro_kfacvi.curvature.factors import KroneckerFactors


class Faulty(nn.Module):
    """Raises in the forward or the backward pass while ``fail`` says so."""

    def __init__(self):
        super().__init__()
        self.fail = None

    def forward(self, x):
        if self.fail == "forward":
            raise RuntimeError("the user's network failed in its forward pass")
        if self.fail == "backward":
            return _FailingBackward.apply(x)
        return x


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the user's network failed in its backward pass")


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), Faulty(), nn.Linear(8, 3))
    model = BayesianModel(net, Categorical(), 1.0, 100)
    guide = KroneckerNormal(model, rho=0.1, damping=1e-2)
    engine = KFACVI(model, guide, lr=0.1, momentum=0.9, num_particles=2, on_nonfinite=Retry(max_retries=1),
                    curvature=CurvatureConfig(inverse_every=1))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    engine.step(x, y)  # a state that is not the initial one
    return model, guide, engine, x, y


def everything(model, guide, engine):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": (v.clone() if torch.is_tensor(v) else v) for k, v in guide.state_dict().items()})
    engine_state = engine.state_dict()
    state.update({"engine.iteration": engine_state["iteration"], "rng": torch.get_rng_state(),
                  "modes": [m.training for m in model.modules()]})
    state.update({f"engine.velocity{i}": v for i, v in enumerate(engine_state["velocities"])})
    return state


def assert_identical(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def fail_in_forward(model, guide, engine):
    model.net[3].fail = "forward"


def fail_in_backward(model, guide, engine):
    model.net[3].fail = "backward"


def fail_in_the_eigendecomposition(model, guide, engine):
    def broken(self, factors):
        raise RuntimeError("eigendecomposition failed (injected)")
    KroneckerFactors.decompose = broken


def fail_with_nonfinite_statistics(model, guide, engine):
    sums = engine.estimator.sums

    def nonfinite(*args, **kwargs):
        stats = sums(*args, **kwargs)
        stats.grads[0][0, 0] = float("nan")
        return stats
    engine.estimator.sums = nonfinite


def fail_in_the_complexity(model, guide, engine):
    def broken():
        raise RuntimeError("complexity failed (injected)")
    guide.complexity = broken


@pytest.mark.parametrize("inject, error, message", [
    (fail_in_forward, RuntimeError, "forward pass"),
    (fail_in_backward, RuntimeError, "backward pass"),
    (fail_in_the_eigendecomposition, RuntimeError, "eigendecomposition failed"),
    (fail_with_nonfinite_statistics, FloatingPointError, "non-finite loss, gradient or curvature"),
    (fail_in_the_complexity, RuntimeError, "complexity failed"),
])
@pytest.mark.parametrize("eval_mode", [False, True])
def test_a_failing_step_changes_nothing(monkeypatch, inject, error, message, eval_mode):
    monkeypatch.setattr(KroneckerFactors, "decompose", KroneckerFactors.decompose)  # undone after the test
    model, guide, engine, x, y = build()
    model.train(not eval_mode)
    inject(model, guide, engine)
    before = everything(model, guide, engine)
    with pytest.warns(RuntimeWarning) if error is FloatingPointError else _no_warning():
        with pytest.raises(error, match=message):
            engine.step(x, y)
    assert_identical(before, everything(model, guide, engine))
    assert guide.damping == 1e-2


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_after_a_failed_step_the_next_step_is_the_one_that_would_have_run():
    """Restored state means a failed attempt leaves no trace: the step after it equals a step on a
    twin that never failed, bit for bit."""
    model, guide, engine, x, y = build()
    twin_model, twin_guide, twin_engine, _, _ = build()
    rng = torch.get_rng_state()
    model.net[3].fail = "backward"
    with pytest.raises(RuntimeError):
        engine.step(x, y)
    model.net[3].fail = None
    loss = engine.step(x, y)
    torch.set_rng_state(rng)
    assert loss == twin_engine.step(x, y)
    for mine, theirs in zip(guide.means(), twin_guide.means()):
        assert torch.equal(mine, theirs)
