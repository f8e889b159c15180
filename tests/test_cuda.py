"""The same computations on CUDA as on the CPU (skipped without a GPU)."""
import pytest
import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal, Predictive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def trained(device, draws):
    torch.manual_seed(0)
    model = BayesianModel(Net().double(), Categorical(), 1.0, 100).to(device)
    guide = KroneckerNormal(model, rho=0.05, damping=1e-2).to(device)
    engine = KFACVI(model, guide, lr=0.05, momentum=0.9, num_particles=3, curvature=CurvatureConfig(inverse_every=1))
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 5
    for step_draws in draws:  # weights, expressed in this device's eigenbases (defined up to sign)
        guide.sample_eigenbasis_blocks = lambda num, d=step_draws: [
            block.curvature.to_eigenbasis(t.to(device)) for block, t in zip(guide.blocks, d)]
        engine.step(x.to(device), y.to(device))
    guide.__dict__.pop("sample_eigenbasis_blocks", None)
    return model, guide


def test_steps_on_cuda_match_the_cpu():
    torch.manual_seed(0)
    _, reference = trained("cpu", [])
    draws = [[b.loc + 0.05 * torch.randn(3, *b.loc.shape, dtype=torch.float64) for b in reference.blocks] for _ in range(4)]
    _, cpu = trained("cpu", draws)
    model, cuda = trained("cuda", draws)
    # eigenvectors are defined up to sign (and rotation within repeated eigenvalues), and so are the
    # coordinates of μ in them: compare μ itself and the rest
    for (name, a), b in zip(cpu.state_dict().items(), cuda.state_dict().values(), strict=True):
        if not torch.is_tensor(a):  # the guide's extra state: family, configuration, γ
            assert a == b, name
        elif "eigenvectors" not in name and "eigenbasis_loc" not in name:
            torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-9, msg=name)
    for a, b in zip(cpu.blocks, cuda.blocks):
        torch.testing.assert_close(a.loc, b.loc.cpu(), rtol=1e-6, atol=1e-9, msg=a.name)
    probs = Predictive(model, cuda, 8)(torch.randn(4, 3, 8, 8, dtype=torch.float64, device="cuda"))
    assert probs.device.type == "cuda"
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64, device="cuda"))
