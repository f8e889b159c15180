"""Training time as users feel it: whole-epoch cost of the presets against IVON and Adam.

The same LeNet5, the same minibatches of 64 CIFAR-10 images (random images of that shape without
the data), a fixed number of steps per candidate, run interleaved — every round gives each
candidate ``--chunk`` steps, in a rotating order — on one machine and thread count, so that load
from elsewhere falls on all of them alike. Candidates:

* ``adam``: the deterministic network, cross-entropy, ``torch.optim.Adam`` (lr 1e-3);
* ``ivon``: ivon-opt's ``IVON`` with one weight sample per step (its authors' CIFAR settings; from
  the ``[peers]`` extra — skipped, and said so, without it);
* ``kfac``, ``kfacvi1``, ``kfacvi10``: ``KFACVI.step`` of the presets ``lenet5-kfac`` and
  ``lenet5-kfacvi`` with M = 1 and 10, built as ``kfacvi train`` builds them (``--preset``).

Prints and, with ``--json FILE``, writes ``{"ratios": {"kfacvi1_over_ivon", "kfacvi10_over_ivon",
"kfac_over_adam"}, "seconds": {candidate: seconds per epoch of --steps steps}, "settings": {...}}``.

    python benchmarks/run_cost.py --threads 1 --steps 157 --json docs/results/run-cost.json
"""
import argparse
import itertools
import json
import platform
import time

import torch
import torch.nn.functional as F

from pyro_kfacvi.experiments.data import DataError, cifar10
from pyro_kfacvi.experiments.models import LeNet5
from pyro_kfacvi.experiments.presets import PRESETS, build


def minibatches(steps, batch_size, data_dir):
    """``steps`` minibatches of CIFAR-10 training images (random ones if the data are missing)."""
    try:
        train = cifar10(data_dir).train.subset(steps * batch_size)
        return list(train.batches(batch_size, shuffle=False)), "CIFAR-10"
    except DataError:
        generator = torch.Generator().manual_seed(0)
        return [(torch.randn(batch_size, 3, 32, 32, generator=generator),
                 torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(steps)], "random"


def adam_step():
    net = LeNet5()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    return step


def ivon_step(num_data):
    import ivon

    net = LeNet5()
    optimizer = ivon.IVON(net.parameters(), lr=0.2, ess=num_data, hess_init=0.5, beta2=0.99999, weight_decay=2e-4)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with optimizer.sampled_params(train=True):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
        optimizer.step()
    return step


def preset_step(name, num_data, steps_per_epoch, **changes):
    config = PRESETS[name].replace(**changes)
    _, _, engine = build(config, num_data, steps_per_epoch)
    return engine.step


def candidates(num_data, steps_per_epoch):
    steps = {"adam": adam_step()}
    try:
        steps["ivon"] = ivon_step(num_data)
    except ImportError:
        print("ivon-opt is not installed (pip install torch==2.14.1 -e \".[peers]\"): IVON skipped")
    steps["kfac"] = preset_step("lenet5-kfac", num_data, steps_per_epoch)
    steps["kfacvi1"] = preset_step("lenet5-kfacvi", num_data, steps_per_epoch, mc_samples=1)
    steps["kfacvi10"] = preset_step("lenet5-kfacvi", num_data, steps_per_epoch, mc_samples=10)
    return steps


def interleaved_seconds(steps, batches, chunk):
    """Seconds each candidate spends on all ``batches``, ``chunk`` steps at a time, in rotating order."""
    seconds = dict.fromkeys(steps, 0.0)
    names = list(steps)
    for round_index, start in enumerate(range(0, len(batches), chunk)):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            begin = time.perf_counter()
            for x, y in batches[start:start + chunk]:
                steps[name](x, y)
            seconds[name] += time.perf_counter() - begin
    return seconds


def ratio(seconds, a, b):
    return seconds[a] / seconds[b] if a in seconds and b in seconds else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=157, help="steps per candidate (157: 10,000 images)")
    parser.add_argument("--chunk", type=int, default=10, help="steps per candidate and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", help="folder of cifar-10-batches-py (default: $KFACVI_DATA)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches, source = minibatches(args.steps, 64, args.data_dir)
    steps = candidates(num_data=50_000, steps_per_epoch=782)
    for name, step in steps.items():  # warm-up: allocations, the first eigendecompositions
        for x, y in itertools.islice(batches, 2):
            step(x, y)
    seconds = interleaved_seconds(steps, batches, args.chunk)
    result = {
        "ratios": {"kfacvi1_over_ivon": ratio(seconds, "kfacvi1", "ivon"),
                   "kfacvi10_over_ivon": ratio(seconds, "kfacvi10", "ivon"),
                   "kfac_over_adam": ratio(seconds, "kfac", "adam")},
        "seconds": seconds,
        "settings": {"steps": args.steps, "chunk": args.chunk, "threads": args.threads, "batch_size": 64,
                     "data": source, "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
