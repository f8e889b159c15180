"""LeNet5 on the first N CIFAR-10 training images with the engine's trust region, for choosing the
defaults (docs/robustness.md, "Defaults"); prints the 10-sample predictive's accuracy on 2,000 test
images after each of 5 epochs.

    python benchmarks/lenet5_defaults_probe.py ETA RHO KL_CLIP LR [N [DAMPING]]

RHO: ``none`` (ELBO-exact KroneckerNormal), 0 (KroneckerDelta) or ρ; momentum 0.9, batch 64, seed 0.
The logs of docs/results/defaults-probes/ (l0 … l9) came from:
l0 ``1.0 0 1e-2 0.3``, l1 ``1.0 none 1e-2 0.3``, l2 ``1.0 0 1e-1 0.3``, l3 ``1.0 none 1e-1 0.3``
(damping 1e-3); l4 ``1.0 0 1e-2 0.3 2000 0.1``, l5 ``1.0 0 1e-3 1.0 2000 0.1``, l6 ``1.0 none 1e-2 0.3
2000 0.1``, l7 ``1e-3 none 1e-2 0.3 2000 0.1``, l8 ``1e-2 none 1e-2 0.3 2000 0.1``, l9 ``1.0 0 1e-2 0.3
2000 1e-2``.
"""
import sys
import time

import torch

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, KroneckerDelta, KroneckerNormal, Predictive
from pyro_kfacvi.experiments.data import cifar10
from pyro_kfacvi.experiments.models import LeNet5


def main(eta, rho, clip, lr, n=2000, damping=1e-3):
    torch.set_num_threads(1)
    data = cifar10()
    train = data.train.subset(n)
    torch.manual_seed(0)
    model = BayesianModel(LeNet5(), Categorical(), eta, n)
    guide = KroneckerDelta(model, damping=damping) if rho == 0 else KroneckerNormal(model, rho=rho, damping=damping)
    engine = KFACVI(model, guide, lr=lr, momentum=0.9, kl_clip=clip)
    order = torch.Generator().manual_seed(0)
    start = time.time()
    for epoch in range(5):
        losses = [engine.step(x, y) for x, y in train.batches(64, shuffle=True, generator=order)]
        probs = Predictive(model, guide, 10)(data.test.images[:2000])
        accuracy = (probs.argmax(-1) == data.test.labels[:2000]).float().mean().item()
        print(epoch, sum(losses) / len(losses), "test acc", accuracy, f"{time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(float(args[0]), None if args[1] == "none" else float(args[1]), float(args[2]), float(args[3]),
         *(int(args[4]),) if len(args) > 4 else (), *(float(args[5]),) if len(args) > 5 else ())
