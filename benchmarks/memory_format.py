"""SGD and KFAC-VI(1) steps on an NCHW input against a channels_last one (same LeNet5 workload as
``benchmarks/step_cost.py``), interleaved step by step in one process.

    python benchmarks/memory_format.py [--threads 2] [--rounds 1000] [--samples 1]
        [--curvature-every 10] [--inverse-every 100] [--kfac-approx reduce]

PyTorch keeps the memory format of a channels_last input through convolutions, activations and
pooling, so the same network runs oneDNN's NHWC kernels; the engine needs no change to take such
an input (`KFACVI.step(x.contiguous(memory_format=torch.channels_last), y)`). Printed: the median
ms per step of each candidate (KFAC-VI with M samples, split damping, the Kronecker approximation,
curvature and eigenbases as given) and their ratios — against SGD in the *same* layout for the overhead, against
plain SGD for what a user gains.
"""
import argparse
import statistics
import time

import torch

from step_cost import EngineSettings, kfacvi_engine, random_batch, sgd_step_fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1, help="M (default 1)")
    parser.add_argument("--curvature-every", type=int, default=10)
    parser.add_argument("--inverse-every", type=int, default=100)
    parser.add_argument("--kfac-approx", default="reduce", choices=["expand", "reduce"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = random_batch(torch.device("cpu"))
    layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    candidates = {}
    for layout, memory_format in layouts.items():
        batch = x.contiguous(memory_format=memory_format)
        engine = kfacvi_engine(x.device, args.samples,
                               EngineSettings(args.curvature_every, args.inverse_every, True, args.kfac_approx))
        candidates[f"sgd {layout}"] = sgd_step_fn(x.device, batch, y, memory_format=memory_format)
        candidates[f"kfacvi {layout}"] = (lambda e, b: lambda: e.step(b, y))(engine, batch)
    times, names = {name: [] for name in candidates}, list(candidates)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"threads {args.threads}, {args.rounds} rounds, M = {args.samples}, curvature every "
          f"{args.curvature_every}, eigenbases every {args.inverse_every}, {args.kfac_approx}; median ms per step:")
    for name, value in ms.items():
        print(f"  {name:<22} {value:6.2f}")
    for a, b in (("kfacvi nchw", "sgd nchw"), ("kfacvi channels_last", "sgd channels_last"),
                 ("kfacvi channels_last", "sgd nchw"), ("sgd channels_last", "sgd nchw"),
                 ("kfacvi channels_last", "kfacvi nchw")):
        print(f"  {a} / {b}: {ms[a] / ms[b]:.2f}")


if __name__ == "__main__":
    main()
