"""Reference networks for 3x32x32 inputs: LeNet-5 and the CIFAR ResNet-18.

Both networks are built only from ``nn.Linear``, ``nn.Conv2d`` and ``nn.BatchNorm2d``
(the only modules holding parameters) and parameter-free functional ops.  Every op acts
on each example independently (apart from BatchNorm's batch statistics in training mode)
and no shape depends on the batch size, so a batch of ``M`` weight samples times ``B``
inputs can be passed flattened as ``(M * B, ...)`` and each parameterised layer's forward
can be replaced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "LeNet5", "MODELS", "ResNet18", "build_model"]


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) adapted to 3x32x32 inputs.

    conv5x5(in_channels -> c1) -> ReLU -> maxpool2 -> conv5x5(c1 -> c2) -> ReLU ->
    maxpool2 -> flatten -> Linear(c2*5*5 -> h1) -> ReLU -> Linear(h1 -> h2) -> ReLU ->
    Linear(h2 -> num_classes).  The defaults ``channels=(6, 16)``, ``hidden=(120, 84)``
    give 62,006 parameters for 3 input channels and 10 classes.  ``dropout > 0`` drops the
    inputs of the three linear layers with that probability in training mode (MC dropout keeps
    the network in training mode at test time); ``dropout=0`` (default) draws no random numbers.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: tuple[int, int] = (6, 16),
        hidden: tuple[int, int] = (120, 84),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        c1, c2 = channels
        h1, h2 = hidden
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(self._drop(x)))
        x = F.relu(self.fc2(self._drop(x)))
        return self.fc3(self._drop(x))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class BasicBlock(nn.Module):
    """Residual block: two 3x3 conv+BN layers with a ReLU between and after the add.

    The shortcut is the identity, or a 1x1 conv+BN when the stride or channel count
    changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) in its CIFAR form.

    3x3 stride-1 stem conv + BN + ReLU with no max-pool, four stages of two
    :class:`BasicBlock` s with 64, 128, 256 and 512 channels and strides 1, 2, 2, 2,
    global average pooling and a linear classifier: 11,173,962 parameters for 10 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        width = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(width, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            width = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


#: Names accepted by :func:`build_model`.
MODELS: dict[str, type[nn.Module]] = {"lenet5": LeNet5, "resnet18": ResNet18}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the network called ``name`` (case-insensitive) with ``kwargs``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return cls(**kwargs)
