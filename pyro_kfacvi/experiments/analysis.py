"""Uncertainty analysis of a CIFAR-10 classifier: calibration, dataset shift and
out-of-distribution detection, from any predictor of per-sample class probabilities.

``predict`` maps normalised images ``(N, 3, 32, 32)`` to ``(S, N, C)`` probabilities p_s(y | x)
(S posterior samples, MC-dropout masks, or S = 1 for a point estimate); the predictive is their
mean p̄ = (1/S) Σ_s p_s (eq. 1). :func:`analyze` measures

1. **calibration** on the CIFAR-10 test set: accuracy, NLL, Brier score, ECE and MCE (15
   equal-width confidence bins), the reliability diagram and the confidence histogram;
2. **dataset shift**: the same on ``shift_size`` test images under every corruption of
   :mod:`pyro_kfacvi.shift` at severities 1..5;
3. **out-of-distribution detection**: with the predictive entropy H[p̄] and the mutual information
   I = H[p̄] − (1/S) Σ_s H[p_s] as scores (higher = more OOD), AUROC and FPR at 95% TPR of the
   whole test set against each set of :mod:`pyro_kfacvi.ood`.

All predictions of one analysis use the same seed, hence the same S weight samples for every
data set. :func:`analyze_checkpoint` does this for a checkpoint of ``kfacvi train`` or
``kfacvi baseline`` and writes ``report.json`` and the figures of :mod:`pyro_kfacvi.plots`
(``kfacvi analyze``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import metrics
from ..guides import KroneckerNormal
from ..predictive import Predictive
from . import baselines
from .checkpoints import METRICS, atomic_write, load_checkpoint
from .data import denormalize, normalize
from .evaluation import ECE_BINS, mean_outputs, private_rng
from .ood import ood_sets
from .shift import CORRUPTIONS, SEVERITIES, corrupt
from .training import Trainer

__all__ = ["REPORT", "analyze", "analyze_checkpoint", "calibration", "histogram", "load_predictor",
           "ood_detection", "summarize", "under_shift"]

REPORT = "report.json"
HISTOGRAM_BINS = 40


def _mean(sample_probs):
    """p̄ in float64, renormalised against float32 round-off."""
    probs = sample_probs.double().mean(0)
    return probs / probs.sum(-1, keepdim=True)


def _predict(predict, raw_images, seed):
    """``predict`` on normalised ``raw_images`` with the weight samples of stream ``seed``."""
    with private_rng(seed, raw_images.device):
        return predict(normalize(raw_images))


def calibration(sample_probs, labels, n_bins=ECE_BINS) -> dict:
    """Accuracy, NLL, Brier score, ECE and MCE of the predictive p̄ of ``(S, N, C)`` probabilities."""
    probs = _mean(sample_probs)
    return {"acc": metrics.accuracy(probs, labels), "nll": metrics.nll(probs, labels),
            "brier": metrics.brier(probs, labels), "ece": metrics.ece(probs, labels, n_bins),
            "mce": metrics.mce(probs, labels, n_bins)}


def _uncertainties(sample_probs):
    """Per-example OOD scores: predictive entropy and mutual information (0 when S = 1)."""
    sample_probs = sample_probs.double()
    return {"entropy": metrics.predictive_entropy(sample_probs), "mutual_information":
            metrics.mutual_information(sample_probs)}


def histogram(values, edges) -> list[int]:
    """Counts of ``values`` in the bins ``[edges[i], edges[i+1])`` (the last bin closed)."""
    index = torch.bucketize(values.double(), edges.double()[1:-1], right=True)
    return torch.bincount(index, minlength=len(edges) - 1).tolist()


def _finite(values) -> list:
    return [None if math.isnan(v) else v for v in values.tolist()]


def under_shift(predict, raw_images, labels, seed=0, log=None) -> list[dict]:
    """:func:`calibration` of the predictive under every corruption and severity 1..5."""
    rows = []
    for name in CORRUPTIONS:
        for severity in range(1, len(SEVERITIES[name]) + 1):
            images = corrupt(raw_images, name, severity, seed)
            rows.append({"corruption": name, "severity": severity,
                         **calibration(_predict(predict, images, seed), labels)})
            if log is not None:
                log(f"shift {name} {severity}: acc {rows[-1]['acc']:.4f}  nll {rows[-1]['nll']:.4f}  "
                    f"ece {rows[-1]['ece']:.4f}")
    return rows


def ood_detection(scores_in: dict, scores_out: dict) -> dict:
    """AUROC and FPR@95%TPR of each score (in-distribution ``scores_in[name]`` vs ``scores_out[name]``)
    and the mean score of the OOD set."""
    result = {}
    for name, inside in scores_in.items():
        outside = scores_out[name]
        result[f"auroc_{name}"] = metrics.auroc(inside, outside)
        result[f"fpr95_{name}"] = metrics.fpr_at_95_tpr(inside, outside)
        result[f"mean_{name}"] = outside.mean().item()
    return result


def summarize(report: dict) -> dict:
    """The headline numbers: test metrics, means over all corruptions and severities, and the
    AUROC of each score averaged over the OOD sets."""
    summary = {k: report["test"][k] for k in ("acc", "nll", "ece", "brier")}
    for key in ("acc", "nll", "ece"):
        summary[f"shift_{key}"] = sum(row[key] for row in report["shift"]) / len(report["shift"])
    for score in ("entropy", "mutual_information"):
        values = [result[f"auroc_{score}"] for result in report["ood"].values()]
        summary[f"ood_auroc_{score}"] = sum(values) / len(values)
        summary.update({f"auroc_{score}_{name}": result[f"auroc_{score}"] for name, result in report["ood"].items()})
    return summary


def analyze(predict, raw_test, labels, ood_images: dict, shift_size=2000, seed=0, log=None) -> dict:
    """The full analysis of ``predict`` (see the module docstring) as a JSON-ready dict.

    :param raw_test: CIFAR-10 test images in ``[0, 1]``, ``(N, 3, 32, 32)``; ``labels`` their classes.
    :param dict ood_images: ``{name: raw images}``, e.g. :func:`pyro_kfacvi.ood.ood_sets`.
    :param int shift_size: the first ``shift_size`` test images are corrupted.
    """
    start = time.perf_counter()
    sample_probs = _predict(predict, raw_test, seed)
    probs = _mean(sample_probs)
    confidence, prediction = probs.max(-1)
    correct = prediction == labels
    diagram = metrics.reliability_diagram(probs, labels, ECE_BINS)
    report = {
        "num_samples": sample_probs.shape[0],
        "seed": seed,
        "test": {**calibration(sample_probs, labels), **{f"mean_{k}": v.mean().item() for k, v in
                                                         _uncertainties(sample_probs).items()}},
        "reliability": {"edges": diagram.edges.tolist(), "counts": diagram.counts.tolist(),
                        "confidence": _finite(diagram.confidence), "accuracy": _finite(diagram.accuracy)},
        "confidence_histogram": {"edges": diagram.edges.tolist(),
                                 "correct": histogram(confidence[correct], diagram.edges),
                                 "incorrect": histogram(confidence[~correct], diagram.edges)},
    }
    if log is not None:
        log("test: " + "  ".join(f"{k} {v:.4f}" for k, v in report["test"].items()))
    report["shift_size"] = min(shift_size, len(labels))
    report["shift"] = under_shift(predict, raw_test[:shift_size], labels[:shift_size], seed, log)
    scores = {"cifar10_test": _uncertainties(sample_probs)}
    scores.update({name: _uncertainties(_predict(predict, images, seed)) for name, images in ood_images.items()})
    report["ood_size"] = {name: len(images) for name, images in ood_images.items()}
    report["ood"] = {name: ood_detection(scores["cifar10_test"], scores[name]) for name in ood_images}
    report["score_histograms"] = {}
    for score in ("entropy", "mutual_information"):
        top = max(s[score].max().item() for s in scores.values())
        edges = torch.linspace(0, top if top > 0 else 1.0, HISTOGRAM_BINS + 1, dtype=torch.float64)
        report["score_histograms"][score] = {"edges": edges.tolist(), **{
            name: histogram(s[score], edges) for name, s in scores.items()}}
    report["summary"] = summarize(report)
    report["time"] = time.perf_counter() - start
    return report


def load_predictor(path, data, num_samples=None, laplace_prior_variance=None):
    """``(predict, info)`` for a checkpoint of ``kfacvi train`` (the Kronecker posterior, eq. 1) or
    ``kfacvi baseline``: ``predict(x)`` returns ``(S, N, C)`` probabilities with ``num_samples``
    samples (default: the run's ``test_samples``; 0: the posterior mean / dropout off).

    ``laplace_prior_variance = η`` replaces a training run's guide by its Kronecker Laplace
    posterior Σ = (1/N)(F̂ + I/(Nη))⁻¹ (:meth:`~pyro_kfacvi.KroneckerNormal.from_guide`; the η that
    ``kfacvi calibrate`` chose is its ``calibration.prior_variance``)."""
    state = load_checkpoint(path, data.test.device)
    if baselines.is_baseline(state):
        if laplace_prior_variance is not None:
            raise ValueError(f"{path} is a baseline run: a Kronecker Laplace posterior needs a run of kfacvi train")
        config, method = baselines.from_checkpoint(state, data.test.images[:1])
        samples = config.test_samples if num_samples is None else num_samples
        return (lambda x: method.samples(x, samples)), {"method": config.method, "test_samples": samples}
    trainer = Trainer.from_checkpoint(path, data)
    config, guide = trainer.config, trainer.guide
    samples = config.test_samples if num_samples is None else num_samples
    info = {"method": config.optimizer, "mc_samples": config.mc_samples, "test_samples": samples}
    if laplace_prior_variance is not None:
        guide = KroneckerNormal.from_guide(guide)
        trainer.model.prior_variance = laplace_prior_variance
        info.update(posterior="kronecker-laplace", prior_variance=laplace_prior_variance)
    if samples == 0:
        predict = lambda x: mean_outputs(trainer.model, guide, x).softmax(-1).unsqueeze(0)  # noqa: E731
    else:
        predict = Predictive(trainer.model, guide, samples).samples
    if not config.normalize_inputs:  # the network was trained on pixels in [0, 1]
        return (lambda x: predict(denormalize(x))), info
    return predict, info


def _run_record(path) -> dict:
    """``{"run": {"config", "final"}}`` from the analysed run's metrics.json (its training seed and
    wall time travel with the report), or ``{}`` if the folder has none."""
    path = Path(path)
    metrics_file = (path if path.is_dir() else path.parent) / METRICS
    if not metrics_file.is_file():
        return {}
    run = json.loads(metrics_file.read_text())
    return {"run": {"config": run["config"], "final": run.get("final")}}


def analyze_checkpoint(path, data, out_dir, num_samples=None, shift_size=2000, ood_size=2000, seed=0,
                       fashion_mnist=None, log=None, laplace_prior_variance=None) -> dict:
    """:func:`analyze` of a checkpoint on ``data`` (:func:`pyro_kfacvi.data.cifar10`, normalised),
    its predictor as :func:`load_predictor` builds it; writes ``out_dir/report.json`` and the
    figures of :func:`pyro_kfacvi.plots.save_figures`."""
    from .plots import save_figures

    predict, info = load_predictor(path, data, num_samples, laplace_prior_variance)
    raw_test = denormalize(data.test.images)
    sets = ood_sets(raw_test, min(ood_size, len(raw_test)), seed, fashion_mnist)
    report = {"checkpoint": str(path), **info, **_run_record(path),
              **analyze(predict, raw_test, data.test.labels, sets, shift_size, seed, log)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out_dir / REPORT, lambda f: f.write(text.encode()))
    figures = save_figures(report, out_dir, title=f"{path}")
    if log is not None:
        log(f"wrote {out_dir / REPORT} and {', '.join(p.name for p in figures)}")
    return report
