"""A zoo of networks and data that a user might bring, trained with the library's defaults only:
``KroneckerNormal(model)`` (ELBO-exact) and ``KFACVI(model, guide)``, nothing tuned.

Each problem builds ``(net, likelihood, data)`` from a seed and says what "trained" means for it:

* ``gap``: 1-D regression with a gap in its inputs, 1-50-50-1 tanh, σ = 0.1 — the predictive
  standard deviation in the gap is at least twice that on the data;
* ``tabular``: 8-feature regression (Friedman's first function) with a known noise σ = 0.1, 8-64-64-1 ReLU — test RMSE within
  25% of σ and the central 95% predictive intervals covering 88–99% of the test points;
* ``spiral``: a 3-class spiral, 2-64-64-3 ReLU — at least 95% train accuracy;
* ``batchnorm-cnn``: a small CNN with BatchNorm on 2-class 12×12 images (a bar, horizontal or
  vertical, in noise) — at least 90% test accuracy;
* ``resnet18``: torchvision's ResNet-18 at 32×32 on batches of 8 — a few steps, finite losses.

Every problem reports ``diverged`` (the step at which a step raised), or its measurements and
``passed``. ``python -m pyro_kfacvi.experiments.zoo --seeds 0-4 [--settings previous] [--damping G]
[--kl-clip C|none] [--inverse-every K] --json FILE`` runs them (the numbers of docs/robustness.md, "Defaults"). The code uses the public API only.
"""
import argparse
import json
import math
import time
import warnings

import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, Gaussian, KroneckerNormal, Predictive


NOISE = 0.1  # σ of the tabular problem


def gap(generator):
    """y = sin(x) + 0.1 ε on x ∈ [−3, −0.9] ∪ [0.9, 3]; the gap is (−0.9, 0.9)."""
    x = (torch.cat([torch.rand(100, 1, generator=generator) * 0.7 - 1,
                    torch.rand(100, 1, generator=generator) * 0.7 + 0.3]) * 3)
    y = x.sin() + 0.1 * torch.randn(x.shape, generator=generator)
    net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    return net, Gaussian(0.1), (x, y), None


def tabular(generator, n=1000):
    """Friedman's first function scaled by 1/10, y = sin(πx₁x₂) + 2(x₃ − ½)² + x₄ + ½x₅ + σε on
    x ~ U[0, 1]⁸ (three inputs irrelevant), σ = 0.1; n training and n test points."""
    x = torch.rand(2 * n, 8, generator=generator)
    f = (math.pi * x[:, 0] * x[:, 1]).sin() + 2 * (x[:, 2] - 0.5).pow(2) + x[:, 3] + 0.5 * x[:, 4]
    y = (f + NOISE * torch.randn(2 * n, generator=generator)).unsqueeze(1)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return net, Gaussian(NOISE), (x[:n], y[:n]), (x[n:], y[n:])


def spiral(generator, n=300):
    """Three interleaved spiral arms, n points."""
    arm = torch.arange(n) % 3
    radius = torch.linspace(0.05, 1, n // 3).repeat_interleave(3)[:n]
    angle = arm * 2 * math.pi / 3 + 4 * radius + 0.2 * torch.randn(n, generator=generator)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    return net, Categorical(), (x, arm), None


def bars(generator, n=512):
    """12×12 one-channel images of a horizontal (class 0) or vertical (class 1) bar at a random
    place, in N(0, 1) noise; n training and n test images."""
    labels = torch.randint(0, 2, (2 * n,), generator=generator)
    images = torch.randn(2 * n, 1, 12, 12, generator=generator)
    where = torch.randint(2, 10, (2 * n,), generator=generator)
    for i, (label, k) in enumerate(zip(labels.tolist(), where.tolist())):
        if label == 0:
            images[i, 0, k, 2:10] += 2.0
        else:
            images[i, 0, 2:10, k] += 2.0
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 9, 2))
    return net, Categorical(), (images[:n], labels[:n]), (images[n:], labels[n:])


def resnet18(generator, n=16):
    """torchvision's ResNet-18 (10 classes) on n random 32×32 images."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    return net, Categorical(), (torch.randn(n, 3, 32, 32, generator=generator),
                                torch.randint(0, 10, (n,), generator=generator)), None


class Problem:
    """A zoo entry: its data and network (``make``), training length and minibatch, and ``judge``,
    which turns the trained ``(model, guide, data)`` into measurements with a ``passed`` entry."""

    def __init__(self, make, steps, batch_size, judge):
        self.make, self.steps, self.batch_size, self.judge = make, steps, batch_size, judge

    def run(self, seed, build=None):
        """Train from ``seed`` with ``build(model) -> (guide, engine)`` (default: the library's defaults)."""
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net, likelihood, train, test = self.make(generator)
        model = BayesianModel(net, likelihood, 1.0, len(train[0]))
        guide, engine = (build or default_build)(model)
        start = time.perf_counter()
        for t in range(self.steps):
            index = torch.randint(0, len(train[0]), (min(self.batch_size, len(train[0])),), generator=generator)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = engine.step(train[0][index], train[1][index])
            except FloatingPointError:
                return {"diverged": t, "passed": False}
        result = {"seconds": time.perf_counter() - start, "final_loss": loss}
        result.update(self.judge(model, guide, train, test))
        return result


def builder(guide_options=None, engine_options=None):
    """``model -> (guide, engine)``: ``KroneckerNormal(model, **guide_options)`` and
    ``KFACVI(model, guide, **engine_options)`` — the library's defaults where nothing is given."""
    def build(model):
        guide = KroneckerNormal(model, **(guide_options or {}))
        return guide, KFACVI(model, guide, **(engine_options or {}))
    return build


default_build = builder()
#: the settings of --settings: the defaults, and the ones the README documented before they existed
#: (lr 1e-3, momentum 0.9, damping 1e-3, no trust region), for the before/after table of docs/robustness.md
SETTINGS = {"defaults": ({}, {}), "previous": ({"damping": 1e-3}, {"lr": 1e-3, "momentum": 0.9, "kl_clip": None})}


def judge_gap(model, guide, train, test):
    grid = torch.linspace(-3, 3, 61).unsqueeze(1)
    sd = Predictive(model, guide, 100)(grid).variance.sqrt().squeeze(1)
    in_gap = grid.squeeze(1).abs() < 0.6
    on_data = grid.squeeze(1).abs().sub(1.95).abs() < 0.9
    ratio = (sd[in_gap].mean() / sd[on_data].mean()).item()
    return {"sd_gap_over_data": ratio, "passed": ratio >= 2.0}


def judge_tabular(model, guide, train, test):
    x, y = test
    prediction = Predictive(model, guide, 100)(x)
    rmse = (prediction.mean - y).pow(2).mean().sqrt().item()
    half_width = 1.959964 * prediction.variance.sqrt()
    coverage = ((y - prediction.mean).abs() <= half_width).float().mean().item()
    return {"test_rmse_over_noise": rmse / NOISE, "coverage_95": coverage,
            "passed": rmse <= 1.25 * NOISE and 0.88 <= coverage <= 0.99}


def accuracy_judge(split, threshold):
    def judge(model, guide, train, test):
        x, y = train if split == "train" else test
        accuracy = (Predictive(model, guide, 20)(x).argmax(-1) == y).float().mean().item()
        return {f"{split}_accuracy": accuracy, "passed": accuracy >= threshold}
    return judge


def judge_finite(model, guide, train, test):
    return {"passed": True}


PROBLEMS = {
    "gap": Problem(gap, steps=1000, batch_size=64, judge=judge_gap),
    "tabular": Problem(tabular, steps=1000, batch_size=64, judge=judge_tabular),
    "spiral": Problem(spiral, steps=1000, batch_size=64, judge=accuracy_judge("train", 0.95)),
    "batchnorm-cnn": Problem(bars, steps=300, batch_size=32, judge=accuracy_judge("test", 0.9)),
    "resnet18": Problem(resnet18, steps=3, batch_size=8, judge=judge_finite),
}


def _seeds(text):
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyro_kfacvi.experiments.zoo", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated (default: all)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="e.g. 0-4 (default)")
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="defaults",
                        help="the library's defaults, or the previously documented settings")
    parser.add_argument("--damping", type=float, help="override the guide's γ")
    parser.add_argument("--kl-clip", type=lambda text: None if text == "none" else float(text),
                        default=argparse.SUPPRESS, help="override the engine's trust region ('none': off)")
    parser.add_argument("--inverse-every", type=int, help="override the eigenbases' refresh interval")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    guide_options, engine_options = (dict(options) for options in SETTINGS[args.settings])
    if args.damping is not None:
        guide_options["damping"] = args.damping
    if "kl_clip" in vars(args):
        engine_options["kl_clip"] = args.kl_clip
    if args.inverse_every is not None:
        engine_options["curvature"] = CurvatureConfig(inverse_every=args.inverse_every)
    build = builder(guide_options, engine_options)
    results = {}
    for name in args.problems.split(","):
        results[name] = {seed: PROBLEMS[name].run(seed, build) for seed in args.seeds}
        runs = results[name].values()
        print(f"{name}: diverged {sum('diverged' in r for r in runs)}/{len(runs)}, passed "
              f"{sum(r['passed'] for r in runs)}/{len(runs)}", {s: r for s, r in results[name].items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": args.settings, "guide": guide_options, "engine": {
                k: repr(v) if k == "curvature" else v for k, v in engine_options.items()},
                "seeds": args.seeds, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
