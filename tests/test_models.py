"""Tests for pyro_kfacvi.experiments.models."""

import pytest
import torch
from torch import nn

from pyro_kfacvi.experiments.models import LeNet5, ResNet18, build_model

ALLOWED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return ResNet18()


def test_lenet5_shape_and_params():
    model = LeNet5()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _num_params(model) == 62_006


def test_lenet5_widths_configurable():
    model = LeNet5(num_classes=7, in_channels=1, channels=(20, 50), hidden=(500, 100))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.fc1.in_features == 50 * 5 * 5
    expected = (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (1250 * 500 + 500) \
        + (500 * 100 + 100) + (100 * 7 + 7)
    assert _num_params(model) == expected


def test_resnet18_shape_and_params(resnet):
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _num_params(resnet) == 11_173_962
    assert ResNet18(num_classes=100).fc.out_features == 100


def test_resnet18_cifar_stem(resnet):
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(c.bias is None for c in convs)


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_only_allowed_parameterised_modules(name, resnet):
    model = resnet if name == "resnet18" else LeNet5()
    kinds = set()
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, ALLOWED), type(module)
            kinds.add(type(module))
    expected = {nn.Linear, nn.Conv2d} | ({nn.BatchNorm2d} if name == "resnet18" else set())
    assert kinds == expected


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_batch_independent(name, resnet):
    # Examples must not mix across the (flattened M*B) batch dimension: in eval mode
    # each row of the output depends only on its own input.
    model = (resnet if name == "resnet18" else LeNet5()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(2)])
    assert torch.allclose(full, single, atol=1e-5)


def test_build_model():
    assert isinstance(build_model("lenet5"), LeNet5)
    assert isinstance(build_model("LeNet5", channels=(12, 32)), LeNet5)
    assert build_model("lenet5", hidden=(10, 10)).fc2.out_features == 10
    with pytest.raises(ValueError, match="lenet5.*resnet18"):
        build_model("vgg16")
