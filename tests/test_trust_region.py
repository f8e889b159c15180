"""The trust region of the defaults: each step's ½α²vᵀ(F̂ + γI)v, the quadratic model's change of
the objective per datum, is at most kl_clip, and a step inside it is left alone."""
import pytest
import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, KroneckerDelta


def dense_quadratic(guide, step):
    """stepᵀ(A ⊗ G + γI)step in the weights' coordinates, from the dense factors."""
    curvature = guide.blocks[0].curvature
    dense = curvature.dense() + guide.damping * torch.eye(curvature.A.shape[0] * curvature.G.shape[0])
    vec = step.T.reshape(-1)
    return vec @ dense @ vec


@pytest.mark.parametrize("lr, clipped", [(10.0, True), (1e-3, False)])
def test_a_step_is_scaled_into_the_trust_region(float64, lr, clipped):
    model = BayesianModel(nn.Linear(3, 2), Categorical(), 1.0, 100)
    guide = KroneckerDelta(model, damping=0.05)
    curvature = guide.blocks[0].curvature
    a, g = torch.randn(4, 4), torch.randn(2, 2)
    factors = (a @ a.T / 4, g @ g.T / 2)
    curvature.commit(factors, curvature.decompose(factors))
    engine = KFACVI(model, guide, lr=lr, momentum=0.0, kl_clip=1e-2)
    grad = torch.randn(2, 4)
    before = guide.blocks[0].loc.clone()
    engine.update([curvature.to_eigenbasis(grad)], lr=lr, momentum=0.0)
    step = guide.blocks[0].loc - before
    unclipped = -lr * torch.linalg.solve(curvature.dense() + 0.05 * torch.eye(8), grad.T.reshape(-1)).reshape(4, 2).T
    change = 0.5 * dense_quadratic(guide, step)
    if clipped:
        assert change.item() == pytest.approx(1e-2, rel=1e-9)
        ratio = step / unclipped  # the same direction, shortened
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and 0 < ratio.flatten()[0] < 1
    else:
        assert change.item() < 1e-2
        assert torch.allclose(step, unclipped)


def test_the_defaults_are_documented_values():
    model = BayesianModel(nn.Linear(3, 2), Categorical(), 1.0, 100)
    guide = KroneckerDelta(model)
    engine = KFACVI(model, guide)
    assert (engine.lr, engine.momentum, engine.kl_clip, guide.damping) == (0.3, 0.9, 1e-2, 1e-2)
    assert (engine.curvature.beta, engine.curvature.inverse_every, engine.num_particles) == (0.05, 10, 1)
    with pytest.raises(ValueError, match="kl_clip must be None or a positive number"):
        KFACVI(model, guide, kl_clip=0.0)
