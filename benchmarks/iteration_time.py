"""Time per training iteration of a preset's network with M weight samples (random CIFAR-shaped data).

Used for docs/results.md: the per-iteration cost of ResNet18 and LeNet5 at M = 1 and 10 on the
device at hand, the projected wall time of a full run (iterations × median step time) and, on
CUDA, the peak memory allocated during the timed steps beyond what was allocated before them.

    python benchmarks/iteration_time.py --model resnet18 --samples 1,10 --device cuda
"""
import argparse
import json
import statistics
import time

import torch

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerDelta, KroneckerNormal
from pyro_kfacvi.experiments.models import build_model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(model_name, num_samples, device, steps, warmup, batch=64):
    torch.manual_seed(0)
    model = BayesianModel(build_model(model_name).to(device), Categorical(), 1.0, 50_000)
    damping = {"damping": 1e-7, "split_damping": True}  # plain K-FAC for M = 1, KFAC-VI (ρ = 6e-5) otherwise
    guide = KroneckerDelta(model, **damping) if num_samples == 1 else KroneckerNormal(model, rho=6e-5, **damping)
    engine = KFACVI(model, guide.to(device), lr=1e-6, momentum=0.9, num_particles=num_samples,
                    curvature=CurvatureConfig(beta=0.333))
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        if i == warmup and device.type == "cuda":
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        engine.step(x, y)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["lenet5", "resnet18"])
    parser.add_argument("--samples", default="1,10", help="comma-separated M values")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="for the projected full-run time")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for m in (int(s) for s in args.samples.split(",")):
        seconds, peak_mb = median_step_seconds(args.model, m, device, args.steps, args.warmup)
        hours = seconds * 782 * args.epochs / 3600
        rows.append({"model": args.model, "M": m, "ms_per_iteration": 1000 * seconds, "projected_hours": hours,
                     "peak_mb": peak_mb})
        memory = f", peak {peak_mb:.0f} MB" if peak_mb is not None else ""
        print(f"{args.model} M={m:3d}: {1000 * seconds:8.1f} ms/iteration{memory}; {args.epochs} epochs × 782 "
              f"iterations ≈ {hours:.2f} h  ({name}, torch {torch.__version__})", flush=True)
    print(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
