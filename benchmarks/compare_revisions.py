"""The KFAC-VI step of the library at two or more git revisions, interleaved with SGD in one process.

    python benchmarks/compare_revisions.py HEAD~1 HEAD [--threads 1] [--rounds 500] [--samples 1]
        [--curvature-every K --inverse-every K2] [--kfac-approx reduce] [--rho 0]

For performance work on the engine: a change that saves 0.05 SGD steps is invisible when two
separate runs of ``step_cost.py`` differ by ±0.1 on a shared machine. Here each revision's
``pyro_kfacvi`` is exported (``git archive``) into a temporary folder as its own package, every
candidate gets the same LeNet5 (random CIFAR-10-shaped batch of 64, split damping, ρ = 6e-5 as in
``step_cost.py``, or ``--rho``), and the rounds alternate SGD and the candidates step by step (rotating the
order). Each revision runs as two engines, built in mirrored order (A B … B A): identical engines
built one after the other differed by up to 0.04 SGD steps however many rounds ran (where their
tensors landed in memory, presumably), so the order of building must not favour a revision.
Printed: per revision the step time over the SGD step at the 5th, 10th and 25th percentiles of
each engine's times, the mean of its two engines and, in brackets, each — interference only adds
time, so the fast tail is the least disturbed estimate. With K > 1 one call is K consecutive
steps, one of which refreshes the curvature.
"""
import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from step_cost import DAMPING, LR, MOMENTUM, NUM_DATA, PRIOR_VARIANCE, RHO, random_batch, sgd_step_fn
from pyro_kfacvi.experiments.models import LeNet5

NEVER = 10**9
REPOSITORY = Path(__file__).resolve().parents[1]


def export_package(revision, folder, name):
    """``pyro_kfacvi`` as of ``revision``, importable as ``name`` (its imports are relative)."""
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", revision, "pyro_kfacvi"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "pyro_kfacvi").rename(folder / name)
    return importlib.import_module(name)


def build_engine(library, model, args):
    """The revision's engine for ``model``: with the guide families (``KroneckerDelta`` for ρ = 0, else
    ``KroneckerNormal``) and a ``CurvatureConfig``, or, at revisions before them, with the single
    ``KroneckerGuide(rho=...)`` and the curvature settings as keywords of ``KFACVI``."""
    curvature = {"curvature_every": args.curvature_every or NEVER, "inverse_every": args.inverse_every or NEVER,
                 "kfac_approx": args.kfac_approx}
    options = {"lr": LR, "momentum": MOMENTUM, "num_particles": args.samples}
    if not hasattr(library, "CurvatureConfig"):
        guide = library.KroneckerGuide(model, rho=args.rho, damping=DAMPING, split_damping=True)
        return library.KFACVI(model, guide, **options, **curvature)
    if args.rho == 0:
        guide = library.KroneckerDelta(model, damping=DAMPING, split_damping=True)
    else:
        guide = library.KroneckerNormal(model, rho=args.rho, damping=DAMPING, split_damping=True)
    return library.KFACVI(model, guide, **options, curvature=library.CurvatureConfig(**curvature))


def engine_step(library, x, y, args):
    """One call: ``curvature_every`` steps of the revision's engine (after one step that refreshes)."""
    torch.manual_seed(0)
    model = library.BayesianModel(LeNet5(), library.Categorical(), PRIOR_VARIANCE, NUM_DATA)
    engine = build_engine(library, model, args)
    engine.step(x, y)
    steps = args.curvature_every or 1
    return lambda: [engine.step(x, y) for _ in range(steps)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="+", help="git revisions, e.g. HEAD~1 HEAD")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1, help="M (default 1)")
    parser.add_argument("--curvature-every", type=int, help="K (default: curvature only in the first step)")
    parser.add_argument("--inverse-every", type=int, help="K2 (default: eigenbases only in the first step)")
    parser.add_argument("--kfac-approx", default="reduce", choices=["expand", "reduce"])
    parser.add_argument("--rho", type=float, default=RHO, help=f"ρ (default {RHO}; 0: plain K-FAC, M = 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = random_batch(torch.device("cpu"))
    sgd, steps = sgd_step_fn(torch.device("cpu"), x, y), args.curvature_every or 1
    candidates = {"sgd": lambda: [sgd() for _ in range(steps)]}
    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, folder)
        libraries = {f"{i}:{revision}": export_package(revision, Path(folder), f"pyro_kfacvi_revision{i}")
                     for i, revision in enumerate(args.revisions)}
        for copy, order in (("a", list(libraries)), ("b", list(libraries)[::-1])):  # mirrored: A B … B A
            for label in order:
                candidates[f"{label}/{copy}"] = engine_step(libraries[label], x, y, args)
        times = {name: [] for name in candidates}
        names = list(candidates)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                candidates[name]()
                times[name].append((time.perf_counter() - start) / steps)
    print(f"threads {args.threads}, M = {args.samples}, curvature every {args.curvature_every or 'never'}, "
          f"eigenbases every {args.inverse_every or 'never'}, {args.kfac_approx}, ρ = {args.rho}; {args.rounds} rounds")
    cuts = {name: statistics.quantiles(t, n=20) for name, t in times.items()}  # 5th, 10th, ... percentiles
    for q in (5, 10, 25):
        sgd_time = cuts["sgd"][q // 5 - 1]
        ratios = {name: cuts[name][q // 5 - 1] / sgd_time for name in names[1:]}
        print(f"  p{q:<3} SGD {1000 * sgd_time:6.2f} ms  " + "  ".join(
            f"{label} {(ratios[label + '/a'] + ratios[label + '/b']) / 2:.3f} ({ratios[label + '/a']:.3f}, "
            f"{ratios[label + '/b']:.3f})" for label in libraries))


if __name__ == "__main__":
    main()
