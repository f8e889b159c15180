"""Which convention do the published LeNet5 hyperparameters need? (docs/results.md, "Conventions")

Trains LeNet5 on CIFAR-10 with Table 1's K-FAC/KFAC-VI row (α⁽⁰⁾ 9e-7, α_base 9e-6, m 0.9, λ 2e-3,
β 0.333, γ 1e-7, p 2, batch 64) under one choice of damping (exact or split), learning-rate scale
and weight-decay form, and prints test/train accuracy of the posterior mean after every epoch.
Single-threaded so that several settings can run side by side on a small machine.

    KFACVI_DATA=../shared/data/cifar10 python benchmarks/convention_sweep.py --split --mode coupled
"""
import argparse
import math
import os
import time

import pyro
import torch

from pyro_kfacvi import (KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerDelta, KroneckerNormal,
                         Predictive, WarmupPolynomialLR)
from pyro_kfacvi.experiments.data import cifar10
from pyro_kfacvi.experiments.models import LeNet5
from pyro_kfacvi.metrics import accuracy, nll


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--split", action="store_true", help="split (factored) damping instead of exact")
    parser.add_argument("--mode", default="decoupled", choices=["coupled", "decoupled", "literal"])
    parser.add_argument("--rho", type=float, default=0.0, help="ρ of KFAC-VI (default 0: plain K-FAC)")
    parser.add_argument("--mc-samples", type=int, default=1)
    parser.add_argument("--channels", default="6,16")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    data = cifar10(os.environ.get("KFACVI_DATA"))
    net = LeNet5(channels=tuple(int(c) for c in args.channels.split(",")))
    model = BayesianModel(net, Categorical(), 1.0, len(data.train))
    damping = {"damping": 1e-7, "split_damping": args.split}
    guide = KroneckerDelta(model, **damping) if args.rho == 0 else KroneckerNormal(model, rho=args.rho, **damping)
    steps = math.ceil(len(data.train) / 64)
    schedule = WarmupPolynomialLR(9e-7 * args.lr_scale, 9e-6 * args.lr_scale, 15 * steps, steps, 1000, 2.0)
    engine = KFACVI(model, guide, lr=schedule, momentum=0.9, weight_decay=2e-3, weight_decay_mode=args.mode,
                    num_particles=args.mc_samples, curvature=CurvatureConfig(beta=0.333))
    order = torch.Generator().manual_seed(0)
    start = time.time()
    for epoch in range(args.epochs):
        for x, y in data.train.batches(64, generator=order):
            engine.step(x, y)  # raises FloatingPointError if the run diverges
        probs = Predictive(model, guide, 1)(data.test.images)
        train = accuracy(Predictive(model, guide, 1)(data.train.images[:5000]), data.train.labels[:5000])
        print(f"epoch {epoch + 1}: test acc {accuracy(probs, data.test.labels):.4f} train acc {train:.4f} "
              f"test nll {nll(probs, data.test.labels):.4f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
