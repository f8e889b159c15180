"""Evaluation of a trained posterior: seeds, the private RNG stream of evaluation, predictives
and the scores (accuracy, NLL, ECE, Brier) that training, baselines and analysis share.

Evaluation draws its weight samples from a private RNG stream (:func:`private_rng`), so that
evaluating does not change a training trajectory, and the same seed reproduces the same numbers.
"""
import contextlib
import random

import numpy as np
import pyro
import torch

from .. import metrics
from ..layers import run_sampled
from ..predictive import Predictive

__all__ = ["ECE_BINS", "EVAL_SEED", "eval_seed", "evaluate", "mean_outputs", "predictive_probs", "private_rng",
           "scores", "seed_everything"]

ECE_BINS = 15
#: offset of the evaluation RNG stream: evaluation after epoch e uses seed + EVAL_SEED·(e + 1), the
#: final evaluation seed + 0 (:func:`eval_seed`).
EVAL_SEED = 1_000_003


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy, Python's ``random`` and Pyro."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def eval_seed(seed: int, epoch: int | None) -> int:
    """Seed of the evaluation stream after ``epoch`` (``None``: the final evaluation)."""
    return (seed + EVAL_SEED * (0 if epoch is None else epoch + 1)) % (2 ** 63)


@contextlib.contextmanager
def private_rng(seed: int, device="cpu"):
    """Within the context, torch's CPU generator and, for a CUDA ``device``, that device's generator
    are seeded with ``seed``; both are restored afterwards (no other generator is touched)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def mean_outputs(model, guide, x, batch_size=1000):
    """Network outputs at the posterior mean μ, shape ``(N, C)``, in eval mode (BatchNorm uses its
    running statistics and does not update them). Draws no random numbers."""
    params = guide.layer_params([block.loc.unsqueeze(0) for block in guide.blocks])
    training = model.training
    model.eval()
    try:
        return torch.cat([run_sampled(model.net, model.layers, params, xb, 1)[0] for xb in x.split(batch_size)])
    finally:
        model.train(training)


def predictive_probs(model, guide, x, num_samples, seed):
    """Class probabilities: the posterior mean's softmax (``num_samples=0``) or the Monte Carlo
    predictive of eq. (1) with ``num_samples`` samples drawn from a private RNG stream."""
    if num_samples == 0:
        return mean_outputs(model, guide, x).softmax(-1)
    with private_rng(seed, x.device):
        return Predictive(model, guide, num_samples)(x)


def scores(probs, labels, prefix="test_"):
    """Accuracy, NLL, ECE (15 bins) and Brier score of ``(N, C)`` class probabilities."""
    probs = probs.double()
    probs = probs / probs.sum(-1, keepdim=True)  # remove float32 round-off before the checks
    return {
        f"{prefix}acc": metrics.accuracy(probs, labels),
        f"{prefix}nll": metrics.nll(probs, labels),
        f"{prefix}ece": metrics.ece(probs, labels, n_bins=ECE_BINS),
        f"{prefix}brier": metrics.brier(probs, labels),
    }


def evaluate(model, guide, split, num_samples, seed=0, prefix="test_"):
    """Accuracy, NLL, ECE (15 bins) and Brier score of the predictive on ``split``."""
    return scores(predictive_probs(model, guide, split.images, num_samples, seed), split.labels, prefix)
