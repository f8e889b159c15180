"""Seconds of the first two steps of torchvision's ResNet-18 (10 classes) on a batch of 8 random
32×32 images, one thread: the first step's eigendecompositions dominate (layer4's 4608 × 4608 input
factors have 512 live rows at 1×1). docs/robustness.md quotes it at 48d245f (zero rows deflated only
after float32 and float64 failed) and at 6409240 (deflated first).

    python benchmarks/resnet18_first_step.py
"""
import time

import torch
import torchvision

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = BayesianModel(torchvision.models.resnet18(num_classes=10), Categorical(), 1.0, 50000)
    guide = KroneckerNormal(model, rho=1e-4, damping=1e-3)
    engine = KFACVI(model, guide, lr=1e-3, momentum=0.0, kl_clip=None, curvature=CurvatureConfig(kfac_approx="reduce"))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(2):
        start = time.perf_counter()
        loss = engine.step(x, y)
        print(f"step {step}: loss {loss:.4g}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
