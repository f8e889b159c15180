"""Where the time of one KFAC-VI step (without curvature) goes, against a plain SGD step.

    python benchmarks/step_breakdown.py --threads 1 [--samples 1] [--split-damping] [--rounds 30]

Same workload as ``benchmarks/step_cost.py`` (LeNet5, random CIFAR-10-shaped batch of 64). The
parts of ``KFACVI.step`` are timed separately, interleaved round-robin with the SGD step and
the whole KFAC-VI step (median ms of ``--rounds`` rounds); then the tensor operations each of
the two steps dispatches are counted. The engine never refreshes its
curvature here (``curvature_every`` and ``inverse_every`` beyond the run), so this is the cost
of the steps between refreshes; ``step_cost.py --curvature-every K`` gives the amortised cost.

A part timed alone runs with caches its neighbours in a step would have left otherwise, so the
second table measures each part in context: whole steps of engines with one part switched off
(the sample fixed, the preconditioner the identity, the checks or the KL term skipped),
interleaved step by step with SGD and the full step for ``--rounds`` × 10 rounds; a part's cost is
the full step minus the step without it, from the 10th percentiles (the least disturbed steps).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from step_cost import EngineSettings, kfacvi_engine, random_batch, sgd_step_fn, tenth_percentile
from pyro_kfacvi.experiments.models import LeNet5

NEVER = 10**9


def parts(engine, x, y):
    """Zero-argument callables for each part of a step without curvature, in the order of ``KFACVI.step``."""
    blocks = engine.guide.sample_eigenbasis_blocks(engine.num_particles)
    stats = engine.statistics(x, y, blocks, with_curvature=False)
    loss = stats.nll + engine.guide.complexity()
    return {
        "check_values (inputs finite, labels in range)": lambda: engine.model.check_values(x, y),
        "sample_eigenbasis_blocks (eq. 12)": lambda: engine.guide.sample_eigenbasis_blocks(engine.num_particles),
        "statistics: forward + backward (eq. 7)": lambda: engine.statistics(x, y, blocks, with_curvature=False),
        "complexity (KL term of the loss)": engine.guide.complexity,
        "all_finite (loss, gradients finite)": lambda: stats.all_finite(loss),
        "update (eqs. 10, 11)": lambda: engine.update(stats.grads, 1e-12, 0.9),
    }


class OperationCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched (each costs microseconds of overhead on a CPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations_per_call(step, calls=10):
    with OperationCounter() as counter:
        for _ in range(calls):
            step()
    return counter.count / calls


def fixed_sample(engine):
    sample = engine.guide.sample_eigenbasis_blocks(engine.num_particles)
    engine.sample_blocks = lambda: sample


def identity_preconditioner(engine):
    ones = [torch.ones_like(block.eigenbasis_loc) for block in engine.guide.blocks]
    engine.guide.scales()  # the sampler's scales stay those of the real eigenvalues (memoised)
    engine.guide.preconditioner = lambda: ones


def no_checks(engine):
    engine.model.check_values = lambda x, y: None
    statistics = engine.statistics

    def unchecked(*args, **kwargs):  # statistics whose finiteness check only reads the loss
        stats = statistics(*args, **kwargs)
        stats.all_finite = lambda loss: (True, loss.item())
        return stats

    engine.statistics = unchecked


def no_kl(engine):
    engine.guide.complexity = lambda: 0.0


#: part of a step → how to switch it off (benchmark-only patches of an engine instance)
SWITCHES = {"drawing the sample (eq. 12)": fixed_sample, "preconditioning (eq. 10)": identity_preconditioner,
            "input and finiteness checks": no_checks, "KL term of the loss": no_kl}


def in_context_costs(make_engine, x, y, rounds):
    """{part: (p10 full step − p10 step without it) / p10 SGD step}, and the full step's ratio."""
    engines = {"full": make_engine()}
    for part, switch_off in SWITCHES.items():
        engines[part] = make_engine()
        switch_off(engines[part])
    candidates = {"SGD": sgd_step_fn(x.device, x, y), **{name: (lambda e: lambda: e.step(x, y))(e)
                                                            for name, e in engines.items()}}
    times = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    p10 = {name: tenth_percentile(t) for name, t in times.items()}
    return {part: (p10["full"] - p10[part]) / p10["SGD"] for part in SWITCHES}, p10["full"] / p10["SGD"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=1, help="M (default 1)")
    parser.add_argument("--split-damping", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x, y = random_batch(device)

    def make_engine():
        engine = kfacvi_engine(device, args.samples, EngineSettings(NEVER, NEVER, args.split_damping))
        engine.step(x, y)  # iteration 0 refreshes once; every later step is a step without curvature
        return engine

    engine = make_engine()
    torch.manual_seed(0)
    net = LeNet5()

    def forward_backward():
        F.cross_entropy(net(x), y).backward()

    candidates = {"SGD step": sgd_step_fn(device, x, y), "plain forward + backward": forward_backward,
                  f"KFAC-VI step, M = {args.samples}": lambda: engine.step(x, y), **parts(engine, x, y)}
    times = {name: [] for name in candidates}
    for _ in range(5):
        for step in candidates.values():
            step()
    for _ in range(args.rounds):
        for name, step in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    sgd = statistics.median(times["SGD step"])
    operations = {name: operations_per_call(candidates[name]) for name in ("SGD step", f"KFAC-VI step, M = {args.samples}")}
    print(f"threads {torch.get_num_threads()}, M = {args.samples}, split damping {args.split_damping}; "
          f"median of {args.rounds} interleaved rounds")
    print(f"  {'part':<48} {'ms':>7} {'/ SGD step':>10}")
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"  {name:<48} {ms:7.2f} {ms / 1000 / sgd:10.2f}")
    for name, count in operations.items():
        print(f"tensor operations per call, {name}: {count:.0f}")
    costs, full = in_context_costs(make_engine, x, y, 10 * args.rounds)
    print(f"in context (10th percentiles of {10 * args.rounds} interleaved rounds): KFAC-VI step / SGD step {full:.2f}")
    for part, cost in costs.items():
        print(f"  {part:<48} {cost:7.2f} SGD steps")


if __name__ == "__main__":
    main()
