"""An independent reference for the curvature: the K-FAC factors A and G of LeNet5 from this
library's FisherEstimator against curvlinops' ``KFACLinearOperator`` (curvlinops-for-pytorch, in
the ``[test]`` extra), in float64, empirical Fisher, K-FAC-expand and -reduce.

Both estimate, per layer, A = E_n[(1/T) Σ_t ã_t ã_tᵀ] and G = E_n[Σ_t g_t g_tᵀ] (expand) or
A = E_n[ā āᵀ], G = E_n[ĝ ĝᵀ] (reduce), ã = [a, 1] with the bias coordinate last, g the gradient of
example n's own loss −log p(y_n | x_n, θ) w.r.t. the layer output. curvlinops gets there from a
mean-reduced ``CrossEntropyLoss`` (its correction B²/N undoes the 1/B of the mean), over two
minibatches of different sizes; ours in one pass with one weight sample at the mean (a
``KroneckerDelta`` guide). curvlinops keeps the factors in the private dictionaries
``_input_covariances`` and ``_gradient_covariances``, keyed by module name (version 3.0.1).
"""
import pytest
import torch
from torch import nn

from pyro_kfacvi import BayesianModel, Categorical, CurvatureConfig, KroneckerDelta
from pyro_kfacvi.curvature import FisherEstimator
from pyro_kfacvi.experiments.models import LeNet5

curvlinops = pytest.importorskip("curvlinops")

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_lenet5_factors_equal_curvlinops_kfac(kfac_approx):
    net = LeNet5()
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    model = BayesianModel(net, Categorical(), 1.0, len(x))
    guide = KroneckerDelta(model)
    ours = FisherEstimator(CurvatureConfig(fisher="empirical", kfac_approx=kfac_approx)).sums(
        model, guide, x, y, guide.sample_eigenbasis_blocks(1)).means_().factors

    reference = curvlinops.KFACLinearOperator(
        net, nn.CrossEntropyLoss(), list(net.parameters()), [(x[:16], y[:16]), (x[16:], y[16:])],
        fisher_type="empirical", kfac_approx=kfac_approx, separate_weight_and_bias=False, check_deterministic=False)
    reference.compute_kronecker_factors()

    assert [block.name for block in guide.blocks] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert sorted(reference._input_covariances) == sorted(reference._gradient_covariances) == sorted(
        block.name for block in guide.blocks)
    errors = {}
    for block, (a, g) in zip(guide.blocks, ours, strict=True):
        a_ref, g_ref = reference._input_covariances[block.name], reference._gradient_covariances[block.name]
        assert a.shape == a_ref.shape and g.shape == g_ref.shape
        errors[block.name] = relative_error(a, a_ref), relative_error(g, g_ref)
    assert max(max(e) for e in errors.values()) < 1e-12, errors


def test_expand_and_reduce_differ_for_the_convolutions_only():
    """The comparison above is not vacuous: K-FAC-expand and -reduce give different factors where a
    layer is shared over positions (the convolutions) and the same ones for the Linear layers."""
    net = LeNet5()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = BayesianModel(net, Categorical(), 1.0, len(x))
    guide = KroneckerDelta(model)
    factors = {approx: FisherEstimator(CurvatureConfig(kfac_approx=approx)).sums(
        model, guide, x, y, guide.sample_eigenbasis_blocks(1)).means_().factors for approx in ("expand", "reduce")}
    for block, expand, reduce in zip(guide.blocks, factors["expand"], factors["reduce"], strict=True):
        differences = [relative_error(e, r) for e, r in zip(expand, reduce, strict=True)]
        if block.name.startswith("conv"):
            assert min(differences) > 1e-3, (block.name, differences)
        else:
            assert max(differences) == 0, (block.name, differences)
