r"""A Kronecker-factored Laplace posterior around a trained run, calibrated on held-out images.

A run trained with ``--validation n`` never saw the last n training images. Around its mean μ and
with the curvature F̂ its training kept, :meth:`pyro_kfacvi.KroneckerNormal.from_guide` gives the
ELBO-exact Gaussian Σ = (1/N)(F̂ + I/(Nη))⁻¹ — for a K-FAC run the Kronecker-factored Laplace
approximation (Ritter et al. 2018) at no extra curvature cost. Its one knob, the prior variance
η, is chosen on those n images by the predictive NLL over a grid (laplace-torch's
``optimize_prior_precision(method="gridsearch")``, by NLL on held-out data); the test set is
looked at once, afterwards::

    kfacvi calibrate --checkpoint runs/kfac --out runs/kfac-laplace

writes ``OUT/metrics.json`` (the calibrated posterior's test metrics under ``final``, the grid and
the chosen η under ``calibration``) and ``OUT/trained/metrics.json`` (the run's guide as trained,
on the same test set), both in the layout of a training run's ``metrics.json``, so that
``kfacvi compare`` aggregates them over seeds.
"""
from __future__ import annotations

import json
import math

from ..guides import KroneckerNormal
from .checkpoints import atomic_write
from .evaluation import eval_seed, evaluate

#: η grid (log-spaced, 10⁻⁶ … 10⁰): from a prior far narrower than the weights' scale to N(0, I).
PRIOR_VARIANCES = tuple(10.0 ** (k / 2) for k in range(-12, 1))


def validation_split(data, config):
    """The images the run held out (``--validation n``: the last n training images), or an error
    if it trained on all of them — calibrating on training images would favour no uncertainty."""
    if not config.validation:
        raise ValueError("the run was trained on every training image: calibrate needs a run trained with "
                         "--validation N, whose last N training images it never saw")
    return data.holdout(config.validation).test


def choose_prior_variance(model, posterior, validation, num_samples, seed, grid=PRIOR_VARIANCES, log=None):
    """The η of ``grid`` with the lowest predictive NLL on ``validation`` (S = ``num_samples``), and
    every grid point's validation metrics. Leaves ``model.prior_variance`` at the chosen η."""
    rows = []
    for eta in grid:
        model.prior_variance = eta
        row = {"prior_variance": eta, **evaluate(model, posterior, validation, num_samples, seed, "validation_")}
        rows.append(row)
        if log:
            log(f"eta {eta:.1e}  validation acc {row['validation_acc']:.4f}  nll {row['validation_nll']:.4f}  "
                f"ece {row['validation_ece']:.4f}")
    finite = [row for row in rows if math.isfinite(row["validation_nll"])]
    best = min(finite, key=lambda row: row["validation_nll"])
    model.prior_variance = best["prior_variance"]
    return best["prior_variance"], rows


def calibrate(trainer, data, num_samples, grid=PRIOR_VARIANCES, log=None):
    """Test metrics of the run's guide as trained and of its Laplace posterior with η chosen on the
    held-out images: ``(trained, calibrated, calibration)``."""
    config, model = trainer.config, trainer.model
    validation = validation_split(data, config)
    seed = eval_seed(config.seed, None)
    trained_samples = num_samples if trainer.guide.distinct_draws(2) > 1 else 0  # a point mass: its mean
    trained = evaluate(model, trainer.guide, data.test, trained_samples, seed, "test_")
    trained["test_samples"] = trained_samples
    original_eta = model.prior_variance
    posterior = KroneckerNormal.from_guide(trainer.guide)
    eta, rows = choose_prior_variance(model, posterior, validation, num_samples, seed, grid, log)
    calibrated = {**evaluate(model, posterior, data.test, num_samples, seed, "test_"), "test_samples": num_samples}
    calibration = {"method": "kronecker-laplace", "prior_variance": eta, "trained_prior_variance": original_eta,
                   "validation_size": len(validation), "grid": rows}
    return trained, calibrated, calibration


def write_metrics(path, config, final, **extra):
    """A ``metrics.json`` in the layout of a training run's (``config``, ``final``)."""
    text = json.dumps({"config": config.to_dict(), "final": final, **extra}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((text + "\n").encode()))
