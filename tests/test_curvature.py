"""Curvature factors and gradients against brute-force per-example references, and batched
samples against looped single-sample passes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import kronecker_guide
from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerDelta, KroneckerNormal
from pyro_kfacvi.curvature.capture import Conv2dStatistics
from pyro_kfacvi.experiments.models import LeNet5
from pyro_kfacvi.layers import Conv2dAdapter, LinearAdapter


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


class SmallCNN(nn.Module):
    def __init__(self, batchnorm=False, **conv):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, **(conv or dict(stride=2, padding=1)))
        self.bn = nn.BatchNorm2d(3) if batchnorm else nn.Identity()
        self.fc = nn.LazyLinear(4)
        self.fc(torch.flatten(self.conv(torch.zeros(1, 2, 6, 6)), 1))

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class SequenceMLP(nn.Module):
    """A Linear layer shared over 3 positions of each example, then a classifier."""

    def __init__(self):
        super().__init__()
        self.shared, self.fc = nn.Linear(4, 5), nn.Linear(15, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.shared(x)), 1))


def setup(net, fisher="empirical", rho=0.0, kfac_approx="expand"):
    model = BayesianModel(net, Categorical(), 1.0, 1000)
    guide = kronecker_guide(model, rho, damping=1e-3)
    return model, guide, KFACVI(model, guide, lr=0.1, curvature=CurvatureConfig(fisher=fisher, kfac_approx=kfac_approx))


def patches(x, conv):
    """Convolution patches by explicit slicing (no unfold): (n, positions, C·k·k)."""
    pad = F.pad(x, (conv.padding[1],) * 2 + (conv.padding[0],) * 2)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    rows = range(0, pad.shape[2] - span_h + 1, sh)
    cols = range(0, pad.shape[3] - span_w + 1, sw)
    return torch.stack([pad[:, :, i:i + span_h:dh, j:j + span_w:dw].reshape(x.shape[0], -1)
                        for i in rows for j in cols], 1)


def brute_force_factors(net, x, y, reduce=False):
    """A and G per layer from one example at a time: activations by hooks, output gradients by
    autograd on that example's own log-likelihood; per position t (expand) or, if ``reduce``, of
    the mean input ā = (1/T) Σ_t ã_t and the summed output gradient ĝ = Σ_t g_t."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sums = {m: [0.0, 0.0] for m in layers}
    for n in range(x.shape[0]):
        inputs, outputs = {}, {}

        def keep(module, args, output):
            inputs[module], outputs[module] = args[0], output

        hooks = [m.register_forward_hook(keep) for m in layers]
        loss = -torch.log_softmax(net(x[n:n + 1]), -1)[0, y[n]]
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, [outputs[m] for m in layers])
        for m, g in zip(layers, grads):
            if isinstance(m, nn.Conv2d):
                a, g = patches(inputs[m], m)[0], g[0].reshape(g.shape[1], -1).T
            else:
                a, g = inputs[m].reshape(-1, m.in_features), g.reshape(-1, m.out_features)
            if m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
            if reduce:
                a, g = a.mean(0, keepdim=True), g.sum(0, keepdim=True)
            sums[m][0] = sums[m][0] + a.T @ a / a.shape[0]   # mean over positions
            sums[m][1] = sums[m][1] + g.T @ g                # sum over positions
    return [(a / x.shape[0], g / x.shape[0]) for a, g in sums.values()]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("net_fn,shape", [
    (mlp, (4,)), (SmallCNN, (2, 6, 6)), (SequenceMLP, (3, 4)),
    (lambda: SmallCNN(stride=(1, 2), padding=2, dilation=2, bias=False), (2, 6, 6)),
    (lambda: SmallCNN(padding=(1, 0)), (2, 6, 6)), (lambda: SmallCNN(dilation=(2, 1)), (2, 6, 6))])
def test_factors_equal_brute_force_per_example(net_fn, shape, kfac_approx):
    net = net_fn()
    model, guide, engine = setup(net, kfac_approx=kfac_approx)
    x, y = torch.randn(7, *shape), torch.randint(0, 3, (7,))
    stats = engine.statistics(x, y, guide.sample_eigenbasis_blocks(1))
    reference = brute_force_factors(net, x, y, reduce=kfac_approx == "reduce")
    for (a, g), (a_ref, g_ref) in zip(stats.factors, reference, strict=True):
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_channels_last_input_gives_the_same_statistics(kfac_approx, num_samples):
    """A channels_last batch (NHWC kernels, ``benchmarks/memory_format.py``) gives the loss, gradients
    and factors of the same batch in NCHW, BatchNorm included."""
    net = SmallCNN(batchnorm=True)
    x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 4, (7,))
    results = []
    for batch in (x, x.contiguous(memory_format=torch.channels_last)):
        model, guide, engine = setup(copy.deepcopy(net), rho=0.1, kfac_approx=kfac_approx)
        torch.manual_seed(2)
        results.append(engine.statistics(batch, y, guide.sample_eigenbasis_blocks(num_samples)))
    nchw, channels_last = results
    torch.testing.assert_close(channels_last.nll, nchw.nll)
    for g, g_ref in zip(channels_last.grads, nchw.grads, strict=True):
        torch.testing.assert_close(g, g_ref)
    for block, reference in zip(channels_last.factors, nchw.factors, strict=True):
        for f, f_ref in zip(block, reference, strict=True):
            torch.testing.assert_close(f, f_ref)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_factors_use_the_layer_output_gradient_before_in_place_activations(fisher, num_samples):
    """G (and BatchNorm's diagonal) come from the gradient w.r.t. each layer's output as the layer
    returned it: an in-place activation after the layer (``ReLU(inplace=True)``, as in
    torchvision's ResNets) leaves the factors of the same network without it unchanged (the
    gradient w.r.t. the modified tensor is the one after the activation); with M > 1 the outputs of
    the second Linear and of BatchNorm are reshaped views of what the layer computed."""
    def net(inplace):
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=inplace), nn.Flatten(),
                             nn.Linear(48, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
    x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 3, (7,))
    factors = []
    for inplace in (False, True):
        model, guide, engine = setup(net(inplace), fisher=fisher, rho=0.1)
        torch.manual_seed(2)  # the same samples, and labels for the MC Fisher
        factors.append(engine.statistics(x, y, guide.sample_eigenbasis_blocks(num_samples)).factors)
    for block, reference in zip(*factors, strict=True):
        for f, f_ref in zip(block, reference, strict=True):
            torch.testing.assert_close(f, f_ref, rtol=0, atol=0)


def test_torchvision_resnet_block_factors_ignore_its_in_place_operations():
    """torchvision's BasicBlock applies ReLU(inplace=True) to BatchNorm outputs and adds its shortcut
    in place (``out += identity``): its factors equal those of the same block with out-of-place
    ReLUs (before the hooks, the first BatchNorm's took the gradient after its ReLU)."""
    from torchvision.models.resnet import BasicBlock

    def net(inplace):
        torch.manual_seed(1)
        block = BasicBlock(3, 3)
        for module in block.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = inplace
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), block, nn.Flatten(), nn.Linear(3 * 6 * 6, 3))

    x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 3, (7,))
    factors = []
    for inplace in (True, False):
        model, guide, engine = setup(net(inplace), rho=0.1)
        torch.manual_seed(2)
        factors.append(engine.statistics(x, y, guide.sample_eigenbasis_blocks(1)).factors)
    assert len(factors[0]) == 6  # conv, conv1, bn1, conv2, bn2, fc
    for block, reference in zip(*factors, strict=True):
        for f, f_ref in zip(block, reference, strict=True):
            torch.testing.assert_close(f, f_ref, rtol=0, atol=0)


def test_a_layer_called_twice_in_one_pass_is_refused():
    """A module applied twice (weights shared between calls) would get the factors of its last call
    only: the first step that records curvature raises, naming the layer."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(torch.tanh(self.hidden(x)))))

    model, guide, engine = setup(Twice())
    with pytest.raises(ValueError, match="layer 'hidden' ran more than once"):
        engine.step(torch.randn(5, 4), torch.randint(0, 3, (5,)))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the reentrant form's, expected
@pytest.mark.parametrize("reentrant,match", [(True, "layer 'a' ran without autograd"),
                                               (False, "different number of tensors was saved")])
def test_activation_checkpointing_is_refused_at_the_first_step(reentrant, match):
    """Activation checkpointing recomputes a layer in the backward pass, after the sampled layers
    have been given back their own forward: the first step raises (reentrant: the layer ran without
    autograd; non-reentrant: torch sees the recomputation save other tensors) and changes nothing."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=reentrant))

    model, guide, engine = setup(Checkpointed(), rho=0.1)
    means = [block.eigenbasis_loc.clone() for block in guide.blocks]
    with pytest.raises(RuntimeError, match=match):
        engine.step(torch.randn(7, 4), torch.randint(0, 3, (7,)))
    assert engine.iteration == 0
    for block, mean in zip(guide.blocks, means, strict=True):
        assert torch.equal(block.eigenbasis_loc, mean)


def test_single_layer_kronecker_is_the_exact_fisher_block():
    """For one example and one layer, A ⊗ G = vec(∇W̃) vec(∇W̃)ᵀ exactly."""
    net = nn.Linear(4, 3)
    model, guide, engine = setup(net)
    x, y = torch.randn(1, 4), torch.tensor([2])
    a, g = engine.statistics(x, y, guide.sample_eigenbasis_blocks(1)).factors[0]
    loss = -torch.log_softmax(net(x), -1)[0, 2]
    gw, gb = torch.autograd.grad(loss, [net.weight, net.bias])
    per_example = torch.cat([gw, gb.unsqueeze(1)], 1).T.reshape(-1)
    torch.testing.assert_close(torch.kron(a, g), torch.outer(per_example, per_example), rtol=1e-10, atol=1e-14)


def test_mc_fisher_is_unbiased_for_the_true_fisher():
    """fisher='mc' draws labels from the model: averaged over many draws, G for the last layer
    equals the true Fisher E_{y~p}[g gᵀ] = diag(p) − p pᵀ computed in closed form."""
    net = nn.Linear(4, 3)
    model, guide, engine = setup(net, fisher="mc")
    x, y = torch.randn(1, 4), torch.tensor([0])
    p = torch.softmax(net(x), -1)[0].detach()
    draws = torch.stack([engine.statistics(x, y, guide.sample_eigenbasis_blocks(1)).factors[0][1] for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), torch.diag(p) - torch.outer(p, p), atol=0.01, rtol=0)


def reference_gradients(net, guide, x, y, sample_blocks):
    """Mean over samples of ∇ −log p(y|x, θ_s)/B, each sample (weights, not eigenbasis
    coordinates) run through the plain network."""
    grads = [torch.zeros_like(b.loc) for b in guide.blocks]
    num = sample_blocks[0].shape[0]
    for s in range(num):
        params, leaves = {}, []
        for block, draw in zip(guide.blocks, sample_blocks):
            leaf = draw[s].clone().requires_grad_()
            leaves.append(leaf)
            for name, value in block.split(leaf).items():
                params[block.sites[name]] = value
        buffers = {k: v.clone() for k, v in net.named_buffers()}
        loss = F.cross_entropy(functional_call(net, {**params, **buffers}, (x,)), y)
        for total, g in zip(grads, torch.autograd.grad(loss, leaves)):
            total += g / num
    return grads


def set_curvature(guide, factors):
    """F̂ = ``factors`` (one tuple per block, β = 1) and their eigenbases, μ carried along."""
    guide.commit_curvature(guide.curvature_update(factors, beta=1.0, refresh=True))


def random_eigenbases(guide):
    """Random curvature factors and their eigenbases for every block (μ carried along)."""
    factors = []
    for block in guide.blocks:
        fs = block.curvature.factors()
        if len(fs) == 2:
            a, g = torch.randn_like(fs[0]), torch.randn_like(fs[1])
            factors.append((a @ a.T, g @ g.T))
        else:
            factors.append((torch.rand_like(block.loc),))
    set_curvature(guide, factors)


@pytest.mark.parametrize("linear_in_eigenbasis", [False, True])
@pytest.mark.parametrize("grouped,kfac_approx", [(None, "expand"), (True, "expand"), (None, "reduce")])
@pytest.mark.parametrize("net_fn,shape", [(lambda: LeNet5(channels=(4, 6), hidden=(12, 8)), (3, 32, 32)),
                                          (lambda: SmallCNN(batchnorm=True), (2, 6, 6)), (mlp, (4,)),
                                          (SequenceMLP, (3, 4))])
def test_batched_samples_equal_looped_samples(net_fn, shape, grouped, kfac_approx, linear_in_eigenbasis, monkeypatch):
    """Batched over samples (first layer on the shared input, later convolutions per sample or
    grouped, Linear layers in the eigenbasis or with formed weights) = one sample at a time = a
    functional_call reference at the weights Q_G Z Q_Aᵀ of draws Z in random eigenbases, rotated
    into the eigenbasis."""
    monkeypatch.setattr(Conv2dAdapter, "grouped", grouped)
    monkeypatch.setattr(LinearAdapter, "runs_in_eigenbasis", staticmethod(lambda module, rows: linear_in_eigenbasis))
    net = net_fn()
    model, guide, engine = setup(net, rho=0.05, kfac_approx=kfac_approx)
    random_eigenbases(guide)
    x, y = torch.randn(5, *shape), torch.randint(0, 3, (5,))
    draws = guide.sample_eigenbasis_blocks(3)
    batched = engine.statistics(x, y, draws)
    looped_engine = KFACVI(model, guide, lr=0.1, curvature=CurvatureConfig(kfac_approx=kfac_approx, chunk_size=1))
    looped = looped_engine.statistics(x, y, draws)
    weights = [block.curvature.from_eigenbasis(d) for block, d in zip(guide.blocks, draws)]
    reference = reference_gradients(net, guide, x, y, weights)
    for block, b, l, r in zip(guide.blocks, batched.grads, looped.grads, reference):
        torch.testing.assert_close(b, block.curvature.to_eigenbasis(r), rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(l, block.curvature.to_eigenbasis(r), rtol=1e-5, atol=1e-10)
    for fb, fl in zip(batched.factors, looped.factors):
        for b, l in zip(fb, fl):
            torch.testing.assert_close(b, l, rtol=1e-5, atol=1e-10)
    # the update: the same fixed draws give the same new means in both modes
    state = copy.deepcopy(guide.state_dict())  # tensors and the guide's extra state (family, config, γ)
    means = []
    for chunk in (None, 1):
        guide.load_state_dict(state)
        engine = KFACVI(model, guide, lr=0.1, momentum=0.5, num_particles=3,
                        curvature=CurvatureConfig(chunk_size=chunk))
        guide.sample_eigenbasis_blocks = lambda num: draws
        engine.step(x, y)
        del guide.sample_eigenbasis_blocks
        means.append([b.loc.clone() for b in guide.blocks])
    for b, l in zip(*means):
        torch.testing.assert_close(b, l, rtol=1e-5, atol=1e-10)


def test_steps_equal_the_dense_natural_gradient_updates_in_weight_space():
    """Two steps, the first refreshing the eigenbases, the second not: in weight space,
    v ← (F̂₀ + γI)⁻¹ḡ + λμ + m v and μ ← μ − αv with the dense F̂₀ = A ⊗ G of the first step's
    factors and ḡ from a functional_call reference at the step's weights — against the engine,
    which keeps μ, v and ḡ in eigenbasis coordinates and re-expresses them at the refresh."""
    net = mlp()
    model = BayesianModel(net, Categorical(), 1.0, 1000)
    guide = KroneckerNormal(model, rho=0.05, damping=0.1)
    engine = KFACVI(model, guide, lr=0.1, momentum=0.5, weight_decay=0.01,
                    curvature=CurvatureConfig(beta=0.5, inverse_every=2))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    mean = [block.loc.clone() for block in guide.blocks]
    velocity = [torch.zeros_like(m) for m in mean]
    preconditioners = None
    for _ in range(2):
        weights = [m + 0.05 * torch.randn(1, *m.shape) for m in mean]
        guide.sample_eigenbasis_blocks = lambda num, w=weights: [
            block.curvature.to_eigenbasis(d) for block, d in zip(guide.blocks, w)]
        engine.step(x, y)
        if preconditioners is None:  # F̂ as of the refresh
            preconditioners = [torch.linalg.inv(block.curvature.dense() + 0.1 * torch.eye(m.numel()))
                               for block, m in zip(guide.blocks, mean)]
        grads = reference_gradients(net, guide, x, y, weights)
        for i, (p, g, m) in enumerate(zip(preconditioners, grads, mean)):
            direction = (p @ g.T.reshape(-1)).reshape(m.shape[1], m.shape[0]).T  # column-major vec
            velocity[i] = direction + 0.01 * m + 0.5 * velocity[i]
            mean[i] = m - 0.1 * velocity[i]
    del guide.sample_eigenbasis_blocks
    for block, m in zip(guide.blocks, mean):
        torch.testing.assert_close(block.loc, m, rtol=1e-9, atol=1e-12)


def test_eigh_falls_back_to_float64_when_float32_returns_nan(monkeypatch):
    """LAPACK's float32 eigh can return NaN silently (denormal entries): the float64 retry must be used."""
    from pyro_kfacvi import curvature

    real_eigh = torch.linalg.eigh

    def flaky(matrix):
        values, vectors = real_eigh(matrix)
        if matrix.dtype == torch.float32:
            return values * float("nan"), vectors
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = torch.randn(5, 5, dtype=torch.float32)
    m = m @ m.T
    values, vectors = curvature.symmetric_eigh(m)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-4, atol=1e-4)


def test_memoised_spectrum_follows_every_change_of_the_curvature():
    """The damped eigenvalues, scales and KL constant are memoised; each must
    be recomputed after a refresh, a changed γ or ρ, ``load_state_dict`` and a dtype change —
    checked against values computed from scratch (a dense reference for the KL)."""
    model = BayesianModel(nn.Linear(3, 2), Categorical(), 2.0, 100)
    guide = KroneckerNormal(model, rho=0.3, damping=0.1, split_damping=True)
    curvature = guide.blocks[0].curvature

    def reference_kl():
        q = guide.distributions()[0]
        cov = torch.diag((q.scale**2).T.reshape(-1))  # eigenbasis covariance, column-major
        basis = torch.kron(curvature.eigenvectors_A, curvature.eigenvectors_G)
        dense = torch.distributions.MultivariateNormal(q.loc.T.reshape(-1), basis @ cov @ basis.T)
        prior = torch.distributions.MultivariateNormal(torch.zeros(8), 2.0 * torch.eye(8))
        return torch.distributions.kl_divergence(dense, prior)

    def check(damping):
        damped = curvature.split_eigenvalues(damping)
        torch.testing.assert_close(guide.preconditioner()[0], damped)
        torch.testing.assert_close(guide.scales()[0][0], guide.rho * damped.rsqrt())
        torch.testing.assert_close(guide.kl_to_prior(), reference_kl())

    def new_factors():
        a, g = torch.randn(4, 4), torch.randn(2, 2)
        set_curvature(guide, [(a @ a.T, g @ g.T)])

    check(0.1)
    before = guide.preconditioner()[0]
    assert guide.preconditioner()[0] is before and guide.scales()[0][0] is guide.scales()[0][0]  # memoised
    new_factors()
    assert not torch.equal(guide.preconditioner()[0], before)
    check(0.1)
    guide.damping = 0.5
    check(0.5)
    guide._rho = 0.7
    check(0.5)
    saved = {k: v.clone() for k, v in curvature.state_dict().items()}
    kl = guide.kl_to_prior()
    new_factors()
    curvature.load_state_dict(saved)
    torch.testing.assert_close(guide.kl_to_prior(), kl)
    guide.float()
    assert guide.preconditioner()[0].dtype == guide.scales()[0][0].dtype == torch.float32


def test_moving_the_guide_regathers_its_tensors():
    """The guide gathers its means and spectra once; ``guide.to(...)`` and ``load_state_dict(...,
    assign=True)`` replace those tensors, and the means it hands out (which the engine updates in
    place) must be the new ones."""
    guide = KroneckerNormal(BayesianModel(nn.Linear(3, 2).float(), Categorical(), 1.0, 10), rho=0.1).float()
    assert guide.preconditioner()[0].dtype == guide.means()[0].dtype == torch.float32
    guide.double()
    assert all(mean is block.eigenbasis_loc for mean, block in zip(guide.means(), guide.blocks, strict=True))
    assert guide.preconditioner()[0].dtype == guide.scales()[0][0].dtype == torch.float64
    assert guide.sample_eigenbasis_blocks(2)[0].dtype == torch.float64
    guide.load_state_dict(copy.deepcopy(guide.state_dict()), assign=True)
    assert all(mean is block.eigenbasis_loc for mean, block in zip(guide.means(), guide.blocks, strict=True))


def test_a_point_mass_draws_its_mean_and_has_the_negative_log_prior_as_complexity():
    """A point mass has no scales and no KL (it used to report zero scales and an infinite KL): its
    draws are all μ, and its complexity term is −log p(μ)/N."""
    model = BayesianModel(mlp(), Categorical(), 1.0, 10)
    guide = KroneckerDelta(model)
    assert not hasattr(guide, "scales") and not hasattr(guide, "kl_to_prior")
    assert guide.distinct_draws(2) == 1
    assert all(torch.equal(draw[0], mean) for draw, mean in zip(guide.sample_eigenbasis_blocks(2), guide.means()))
    torch.testing.assert_close(guide.complexity(), -guide.log_prior_of_mean() / 10)


def test_log_prior_of_the_mean_equals_the_prior_density_of_the_weights():
    """log N(μ; 0, ηI) from ‖μ‖² in eigenbasis coordinates, against the prior's log-density summed over
    the network's weights after a few K-FAC steps (rotated eigenbases, moved means)."""
    model = BayesianModel(mlp(), Categorical(), 2.0, 10)
    guide = KroneckerDelta(model, damping=0.1)
    engine = KFACVI(model, guide, lr=0.1, momentum=0.9, curvature=CurvatureConfig(inverse_every=1))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        engine.step(x, y)
    reference = sum(torch.distributions.Normal(0.0, 2.0**0.5).log_prob(p).sum() for p in guide.mean_network().parameters())
    torch.testing.assert_close(guide.log_prior_of_mean(), reference)


def test_memo_is_bypassed_under_inference_mode():
    guide = KroneckerNormal(BayesianModel(nn.Linear(3, 2), Categorical(), 1.0, 10), rho=0.1)
    with torch.inference_mode():
        inside = guide.preconditioner()[0]
    outside = guide.preconditioner()[0]
    assert inside.is_inference() and not outside.is_inference()


@pytest.mark.parametrize("conv", [dict(), dict(stride=2, padding=1), dict(stride=(2, 3), dilation=(1, 2), padding=(2, 0))])
def test_mean_patch_equals_the_mean_of_all_patches_also_after_inference_mode(conv):
    """K-FAC-reduce's mean patch (selection-matrix products, cached per shape) against the mean of
    the unfolded patches; the cache filled under inference mode must not leak inference tensors."""
    module = nn.Conv2d(2, 3, 3, **conv).double()
    x = torch.randn(4, 2, 9, 11, dtype=torch.float64)
    patches = F.unfold(x, 3, dilation=module.dilation, padding=module.padding, stride=module.stride)
    reference = patches.mean(-1).reshape(4, 2, 3, 3)
    with torch.inference_mode():
        Conv2dStatistics.mean_patches(module, x.clone())
    leaf = x.clone().requires_grad_()
    mean, positions = Conv2dStatistics.mean_patches(module, leaf)
    torch.testing.assert_close(mean, reference)
    assert positions == patches.shape[-1]
    mean.sum().backward()  # fails if a cached selection matrix is an inference tensor
    assert leaf.grad.shape == x.shape


@pytest.mark.parametrize("likelihood, y", [
    (Categorical(), torch.tensor([0, 2, 1, 2])),
    (Gaussian(0.7), torch.randn(4, 3)),
])
def test_likelihood_nll_equals_the_pyro_distribution(likelihood, y):
    """The fused NLL of the engine against Pyro's log_prob, with outputs for M = 2 weight samples."""
    output = torch.randn(2, 4, 3)
    expected = -likelihood.distribution(output).log_prob(y).sum()
    torch.testing.assert_close(likelihood.nll(output, y), expected)


def random_spd(d):
    x = torch.randn(d, 2 * d)
    return x @ x.T / (2 * d)


@pytest.mark.parametrize("track", [False, True])
def test_tracked_eigenvalues_are_the_rayleigh_quotients_in_the_kept_bases(track):
    """CurvatureConfig(track_eigenvalues=True): an update of F̂ between eigendecompositions gets the
    eigenvalues diag(Qᵀ A Q), diag(Qᵀ G Q) in the kept bases Q (dense products here); the bases, μ
    and the carried momentum stay bit for bit, and the preconditioner of eq. (10) and q's scales of
    eq. (12) follow. Without tracking, the eigenvalues stay those of the last decomposition."""
    model = BayesianModel(nn.Linear(4, 3), Categorical(), 1.0, 100)
    guide = KroneckerNormal(model, rho=0.1, damping=1e-3)
    a0, g0 = random_spd(5), random_spd(3)
    set_curvature(guide, [(a0, g0)])
    curvature = guide.blocks[0].curvature
    assert torch.allclose(curvature.eigenvalues_A, torch.linalg.eigvalsh(a0))
    bases = curvature.eigenvectors_A.clone(), curvature.eigenvectors_G.clone()
    mean, velocity = guide.blocks[0].eigenbasis_loc.clone(), torch.randn(3, 5)
    carried = velocity.clone()
    a1, g1 = random_spd(5), random_spd(3)
    update = guide.curvature_update([(a1, g1)], beta=0.25, refresh=False, track_eigenvalues=track)
    guide.commit_curvature(update, carried=[(carried,)])
    a, g = 0.75 * a0 + 0.25 * a1, 0.75 * g0 + 0.25 * g1
    assert torch.allclose(curvature.A, a) and torch.allclose(curvature.G, g)
    expected = (torch.diagonal(bases[0].T @ a @ bases[0]), torch.diagonal(bases[1].T @ g @ bases[1])) if track \
        else (torch.linalg.eigvalsh(a0), torch.linalg.eigvalsh(g0))
    assert torch.allclose(curvature.eigenvalues_A, expected[0]) and torch.allclose(curvature.eigenvalues_G, expected[1])
    assert torch.equal(curvature.eigenvectors_A, bases[0]) and torch.equal(curvature.eigenvectors_G, bases[1])
    assert torch.equal(guide.blocks[0].eigenbasis_loc, mean) and torch.equal(carried, velocity)
    damped = torch.outer(expected[1], expected[0]) + 1e-3
    assert torch.allclose(guide.preconditioner()[0], damped)
    assert torch.allclose(guide.scales()[0][0], 0.1 * damped.rsqrt())
