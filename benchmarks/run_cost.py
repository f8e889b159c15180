"""Training time as users feel it: whole-epoch cost of the presets against IVON and Adam.

The same LeNet5, the same minibatches of 64 CIFAR-10 images (random images of that shape without
the data), a fixed number of steps per candidate, run interleaved — every round gives each
candidate ``--chunk`` steps, in a rotating order — on one machine and thread count, so that load
from elsewhere falls on all of them alike. Candidates:

* ``adam``: the deterministic network, cross-entropy, ``torch.optim.Adam`` (lr 1e-3), as ``kfacvi
  baseline --method adam`` trains it;
* ``ivon``: ivon-opt's ``IVON`` with one weight sample per step and its cosine schedule, as ``kfacvi
  baseline --method ivon`` trains it (its authors' CIFAR settings; from the ``[peers]`` extra —
  skipped, and said so, without it);
* ``kfac``, ``kfacvi1``, ``kfacvi10``: ``KFACVI.step`` of the presets ``lenet5-kfac`` and
  ``lenet5-kfacvi`` (``--presets paper``, Table 1's) or ``lenet5-kfac-tuned`` and
  ``lenet5-kfacvi-tuned`` (``--presets tuned``: the cheap curvature schedule) with M = 1 and 10,
  built as ``kfacvi train`` builds them (``--preset``), with the ``TrainConfig`` changes of
  ``--set KEY=VALUE`` (e.g. ``--set curvature_every=16``).

M weight samples need M forward and backward passes, so ten ``adam`` steps are the floor of a
KFAC-VI(10) step on the same hardware; ``floors`` reports it in IVON steps (10 × adam / ivon).
With ``--memory``, the peak memory of one KFAC-VI preset step with M = 50 (the same changes) is
measured in a fresh subprocess as ``benchmarks/step_cost.py`` measures it (RSS high-water mark on
CPU, ``max_memory_allocated`` on CUDA, over two steps after an untimed one).

``--peers`` adds ``mc-dropout`` and ``mean-field`` (the ``kfacvi baseline`` objects, dropout 0.05
as the peers sweep chose) and ``noisy-kfac`` (the KFAC-VI preset with ``optimizer="noisy-kfac"``,
η = 0.01, M = 1).

Prints and, with ``--json FILE``, writes ``{"ratios": {"kfacvi1_over_ivon", "kfacvi10_over_ivon",
"kfac_over_adam"}, "floors": {"kfacvi10_over_ivon": ...}, "over_adam": {candidate: seconds /
adam's}, "seconds": {candidate: seconds of --steps steps}, "memory_mb": {"kfacvi50": ...},
"settings": {...}}``.

    python benchmarks/run_cost.py --threads 1 --steps 157 --memory --json docs/results/run-cost.json
"""
import argparse
import ast
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import torch

from pyro_kfacvi.experiments import baselines
from pyro_kfacvi.experiments.baselines import BaselineConfig
from pyro_kfacvi.experiments.data import DataError, cifar10
from pyro_kfacvi.experiments.presets import PRESETS, build
from step_cost import MMAP_THRESHOLD, peak_step_memory, synchronize


#: --presets: the K-FAC and KFAC-VI presets timed
PRESET_FAMILIES = {"paper": ("lenet5-kfac", "lenet5-kfacvi"), "tuned": ("lenet5-kfac-tuned", "lenet5-kfacvi-tuned")}


def minibatches(steps, batch_size, data_dir, device):
    """``steps`` minibatches of CIFAR-10 training images on ``device`` (random ones if the data are missing)."""
    try:
        train = cifar10(data_dir).train.subset(steps * batch_size)
        batches, source = list(train.batches(batch_size, shuffle=False)), "CIFAR-10"
    except DataError:
        generator = torch.Generator().manual_seed(0)
        batches, source = [(torch.randn(batch_size, 3, 32, 32, generator=generator),
                            torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(steps)], "random"
    return [(x.to(device), y.to(device)) for x, y in batches], source


def preset_step(name, num_data, steps_per_epoch, device, **changes):
    """``KFACVI.step`` of preset ``name`` with the ``TrainConfig`` ``changes``, as ``kfacvi train`` builds it."""
    config = PRESETS[name].replace(**changes)
    model, _, engine = build(config, num_data, steps_per_epoch)
    model.to(device)
    return engine.step


def baseline_step(method, num_data, device, **settings):
    """``step`` of the ``kfacvi baseline --method method`` object (its ``BaselineConfig`` defaults)."""
    config = BaselineConfig(method=method, **settings)
    return baselines.build(config, torch.zeros(1, 3, 32, 32, device=device), num_data).step


def peer_steps(num_data, steps_per_epoch, device, changes, family):
    """``--peers``: MC dropout and mean-field SVI as ``kfacvi baseline`` trains them, and Noisy K-FAC
    (the ELBO-exact KFAC-VI preset with M = 1 and the prior variance 0.01 of the peers sweep)."""
    return {"mc-dropout": baseline_step("mc-dropout", num_data, device, dropout=0.05),
            "mean-field": baseline_step("mean-field", num_data, device),
            "noisy-kfac": preset_step(PRESET_FAMILIES[family][1], num_data, steps_per_epoch, device, **changes,
                                      optimizer="noisy-kfac", prior_variance=0.01, mc_samples=1)}


def candidates(num_data, steps_per_epoch, device, changes, family="paper", peers=False):
    steps = {"adam": baseline_step("adam", num_data, device)}
    try:
        steps["ivon"] = baseline_step("ivon", num_data, device)
    except ImportError:
        print("ivon-opt is not installed (pip install torch==2.14.1 -e \".[peers]\"): IVON skipped")
    kfac, kfacvi = PRESET_FAMILIES[family]
    steps["kfac"] = preset_step(kfac, num_data, steps_per_epoch, device, **changes)
    steps["kfacvi1"] = preset_step(kfacvi, num_data, steps_per_epoch, device, **changes, mc_samples=1)
    steps["kfacvi10"] = preset_step(kfacvi, num_data, steps_per_epoch, device, **changes, mc_samples=10)
    if peers:
        steps.update(peer_steps(num_data, steps_per_epoch, device, changes, family))
    return steps


def interleaved_seconds(steps, batches, chunk, device):
    """Seconds each candidate spends on all ``batches``, ``chunk`` steps at a time, in rotating order."""
    seconds = dict.fromkeys(steps, 0.0)
    names = list(steps)
    for round_index, start in enumerate(range(0, len(batches), chunk)):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            synchronize(device)
            begin = time.perf_counter()
            for x, y in batches[start:start + chunk]:
                steps[name](x, y)
            synchronize(device)
            seconds[name] += time.perf_counter() - begin
    return seconds


def peak_memory_mb(changes, device, family="paper", num_samples=50):
    """Run in a fresh process: the peak memory increase (MB) of two KFAC-VI preset steps with M =
    ``num_samples`` after an untimed one (``benchmarks/step_cost.py``'s measurement)."""
    x, y = minibatches(1, 64, None, device)[0][0]
    step = preset_step(PRESET_FAMILIES[family][1], 50_000, 782, device, **changes, mc_samples=num_samples)
    return peak_step_memory(lambda: step(x, y), device)


def measure_memory(argv):
    """``{"kfacvi50": MB}`` from a subprocess of this script with the same arguments."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    probe = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-probe"],
                           capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        print(f"memory probe failed:\n{probe.stderr[-2000:]}")
        return {}
    return {"kfacvi50": float(probe.stdout.strip().splitlines()[-1])}


def parse_change(text):
    """``KEY=VALUE`` → ``(KEY, VALUE)``, VALUE as a Python literal where it parses as one."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def ratio(seconds, a, b):
    return seconds[a] / seconds[b] if a in seconds and b in seconds else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=157, help="steps per candidate (157: 10,000 images)")
    parser.add_argument("--chunk", type=int, default=10, help="steps per candidate and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", help="folder of cifar-10-batches-py (default: $KFACVI_DATA)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--presets", choices=PRESET_FAMILIES, default="paper",
                        help="paper: lenet5-kfac and lenet5-kfacvi; tuned: their -tuned presets")
    parser.add_argument("--set", type=parse_change, action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig change for the presets' candidates (repeatable)")
    parser.add_argument("--peers", action="store_true", help="also MC dropout, mean-field SVI and Noisy K-FAC")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of an M = 50 step (subprocess)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, changes = torch.device(args.device), dict(args.set)
    if args.memory_probe:
        print(peak_memory_mb(changes, device, args.presets))
        return
    batches, source = minibatches(args.steps, 64, args.data_dir, device)
    steps = candidates(50_000, 782, device, changes, args.presets, args.peers)
    for name, step in steps.items():  # warm-up: allocations, the first eigendecompositions
        for x, y in itertools.islice(batches, 2):
            step(x, y)
    seconds = interleaved_seconds(steps, batches, args.chunk, device)
    result = {
        "ratios": {"kfacvi1_over_ivon": ratio(seconds, "kfacvi1", "ivon"),
                   "kfacvi10_over_ivon": ratio(seconds, "kfacvi10", "ivon"),
                   "kfac_over_adam": ratio(seconds, "kfac", "adam")},
        "floors": {"kfacvi10_over_ivon": 10 * ratio(seconds, "adam", "ivon") if "ivon" in seconds else None},
        "over_adam": {name: ratio(seconds, name, "adam") for name in seconds},
        "seconds": seconds,
        "memory_mb": measure_memory(sys.argv[1:] if argv is None else argv) if args.memory else {},
        "settings": {"steps": args.steps, "chunk": args.chunk, "threads": args.threads, "batch_size": 64,
                     "device": str(device), "presets": PRESET_FAMILIES[args.presets], "changes": changes, "data": source, "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
