"""How to run one convolution with M weight samples, measured: the choices behind
:class:`pyro_kfacvi.layers.Conv2dAdapter` and :class:`pyro_kfacvi.curvature.capture.Conv2dStatistics`.

    python benchmarks/conv_strategies.py [--device cuda] [--threads N]

For LeNet5's two convolutions and a ResNet18 block convolution (batch 64), forward + backward
of the sample-stacked input ``(M·64, C, H, W)`` through M filter banks, median of interleaved
repeats:

* ``grouped``: one ``conv2d(groups=M)`` on the input reshaped to ``(64, M·C, H, W)`` (and back);
* ``per-sample``: M ordinary convolutions on the M row blocks, concatenated;
* ``shared``: for a first layer, whose input is the same for every sample: one convolution of
  the 64 distinct images with the M filter banks stacked to ``M·C_out`` output channels.

And the K-FAC input factor A = Σ ã ãᵀ of a convolution: ``F.unfold`` followed by a transpose
copy, against im2col as one copy of a strided view (what the recorder does); and K-FAC-reduce's
mean input patch of the 64 images: the mean of the strided view of all patches, against the
two products with 0/1 selection matrices of the recorder
(:meth:`pyro_kfacvi.curvature.capture.Conv2dStatistics.mean_patches`).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pyro_kfacvi.curvature.capture import Conv2dStatistics

BATCH = 64
LAYERS = {  # name: (C_in, C_out, H = W, kernel, is the network input)
    "lenet5.conv1": (3, 6, 32, 5, True),
    "lenet5.conv2": (6, 16, 14, 5, False),
    "resnet18.layer2": (128, 128, 16, 3, False),
}


def median_ms(functions, device, repeats):
    """Median wall milliseconds of each function, interleaved after one warm-up call each."""
    times = {name: [] for name in functions}
    for f in functions.values():
        f()
    for _ in range(repeats):
        for name, f in functions.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def strategies(c_in, c_out, size, kernel, num_samples, device, first):
    """The three ways, for a layer that needs the gradient of its input unless it is ``first``."""
    x = torch.randn(num_samples * BATCH, c_in, size, size, device=device, requires_grad=not first)
    w = torch.randn(num_samples, c_out, c_in, kernel, kernel, device=device, requires_grad=True)
    distinct = x.detach()[:BATCH].clone()

    def grouped():
        stacked = x.unflatten(0, (num_samples, -1)).transpose(0, 1).flatten(1, 2)
        out = F.conv2d(stacked, w.flatten(0, 1), groups=num_samples)
        out.unflatten(1, (num_samples, -1)).transpose(0, 1).flatten(0, 1).sum().backward()

    def per_sample():
        torch.cat([F.conv2d(rows, wi) for rows, wi in zip(x.chunk(num_samples), w)]).sum().backward()

    def shared():
        out = F.conv2d(distinct, w.flatten(0, 1))
        out.unflatten(1, (num_samples, -1)).transpose(0, 1).flatten(0, 1).sum().backward()

    return {"grouped": grouped, "per-sample": per_sample, "shared": shared}


def input_factor(c_in, size, kernel, num_samples, device):
    x = torch.randn(num_samples * BATCH, c_in, size, size, device=device)

    def unfold_then_transpose():
        patches = F.unfold(x, kernel)
        columns = patches.transpose(0, 1).reshape(patches.shape[1], -1)
        return columns @ columns.T

    def strided_view():
        windows = x.unfold(2, kernel, 1).unfold(3, kernel, 1)
        columns = windows.permute(1, 4, 5, 0, 2, 3).reshape(c_in * kernel * kernel, -1)
        return columns @ columns.T

    return {"unfold": unfold_then_transpose, "strided": strided_view}


def mean_patch(c_in, size, kernel, device):
    x = torch.randn(BATCH, c_in, size, size, device=device)

    def strided_mean():
        return x.unfold(2, kernel, 1).unfold(3, kernel, 1).mean((2, 3))

    conv = nn.Conv2d(c_in, 1, kernel).to(device)

    def products():
        return Conv2dStatistics.mean_patches(conv, x)[0]

    return {"strided": strided_mean, "products": products}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--samples", default="4,10,50")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {BATCH}; forward + backward, median ms\n")
    print(f"{'layer':<16} {'M':>3} {'grouped':>9} {'per-sample':>11} {'shared':>9} "
          f"{'per-sample/grouped':>19} {'shared/grouped':>15}")
    for name, (c_in, c_out, size, kernel, first) in LAYERS.items():
        for m in map(int, args.samples.split(",")):
            ms = median_ms(strategies(c_in, c_out, size, kernel, m, device, first), device, args.repeats)
            shared = f"{ms['shared']:9.1f}" if first else f"{'-':>9}"
            ratio = f"{ms['shared'] / ms['grouped']:15.2f}" if first else f"{'-':>15}"
            print(f"{name:<16} {m:3d} {ms['grouped']:9.1f} {ms['per-sample']:11.1f} {shared} "
                  f"{ms['per-sample'] / ms['grouped']:19.2f} {ratio}")
    print(f"\ninput factor A (M·64 images): {'layer':<16} {'M':>3} {'unfold':>8} {'strided':>8} {'strided/unfold':>15}")
    for name, (c_in, _, size, kernel, first) in LAYERS.items():
        for m in (1,) if first else map(int, args.samples.split(",")):
            ms = median_ms(input_factor(c_in, size, kernel, m, device), device, args.repeats)
            print(f"{'':<30}{name:<16} {m:3d} {ms['unfold']:8.1f} {ms['strided']:8.1f} "
                  f"{ms['strided'] / ms['unfold']:15.2f}")
    print(f"\nmean patch (64 images, reduce): {'layer':<16} {'strided mean':>12} {'products':>12} {'products/strided':>17}")
    for name, (c_in, _, size, kernel, _) in LAYERS.items():
        ms = median_ms(mean_patch(c_in, size, kernel, device), device, 10 * args.repeats)
        print(f"{'':<32}{name:<16} {ms['strided']:12.3f} {ms['products']:12.3f} {ms['products'] / ms['strided']:17.2f}")


if __name__ == "__main__":
    main()
