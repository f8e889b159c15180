"""Evaluation metrics for (Bayesian) classifiers: accuracy, proper scoring rules,
calibration, predictive-uncertainty decompositions and OOD-detection scores.

All functions are vectorised torch code and accept tensors (or anything
``torch.as_tensor`` understands, e.g. numpy arrays / nested lists).

Conventions
-----------
* ``probs``: ``(N, C)`` class probabilities (rows on the simplex).
* ``sample_probs``: ``(S, N, C)`` per-posterior-sample class probabilities.
* ``labels``: ``(N,)`` integer class indices in ``[0, C)``.
* Scalar metrics return Python ``float``; per-example quantities return
  tensors of shape ``(N,)`` on the input's device.
* Invalid input (wrong shape, mismatched lengths, empty input, non-finite
  values, entries that are not probabilities, labels out of range) raises
  ``ValueError`` with a descriptive message.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "mce",
    "ReliabilityDiagram",
    "reliability_diagram",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "auroc",
    "fpr_at_95_tpr",
]

# Absolute tolerance for "is a probability vector" checks (values in [0, 1],
# rows summing to 1).  Lenient enough for float32/float16 softmax outputs and
# Monte-Carlo averages, strict enough to catch logits passed by mistake.
_PROB_ATOL = 1e-3


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _as_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - depends on input type
            raise ValueError(f"`{name}` could not be converted to a tensor: {exc}") from exc
    return x


def _check_probs(probs, name: str = "probs", ndims=(2,)) -> torch.Tensor:
    probs = _as_tensor(probs, name)
    if probs.ndim not in ndims:
        shapes = " or ".join(
            {2: "(N, C)", 3: "(S, N, C)"}[d] for d in ndims
        )
        raise ValueError(
            f"`{name}` must have shape {shapes}; got shape {tuple(probs.shape)}"
        )
    if not torch.is_floating_point(probs):
        raise ValueError(f"`{name}` must be a floating-point tensor; got dtype {probs.dtype}")
    if probs.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(probs.shape)})")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")
    lo, hi = probs.min().item(), probs.max().item()
    if lo < -_PROB_ATOL or hi > 1 + _PROB_ATOL:
        raise ValueError(
            f"`{name}` must contain probabilities in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
            "(did you pass logits? apply softmax first)"
        )
    dev = (probs.sum(-1, dtype=torch.float64) - 1.0).abs().max().item()
    if dev > _PROB_ATOL:
        raise ValueError(
            f"`{name}` rows must sum to 1 over the class (last) dimension; "
            f"max |sum - 1| = {dev:.4g}"
        )
    return probs


def _check_labels(labels, n: int, n_classes: int, device) -> torch.Tensor:
    labels = _as_tensor(labels, "labels")
    if labels.ndim != 1:
        raise ValueError(f"`labels` must have shape (N,); got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("`labels` is empty")
    if labels.shape[0] != n:
        raise ValueError(
            f"`labels` has length {labels.shape[0]} but `probs` has {n} rows"
        )
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"`labels` must contain integer class indices; got dtype {labels.dtype}")
    if torch.is_floating_point(labels):
        if not bool(torch.isfinite(labels).all()):
            raise ValueError("`labels` contains non-finite values (NaN or inf)")
        if not bool((labels == labels.round()).all()):
            raise ValueError("`labels` must contain integer class indices; got non-integral values")
    labels = labels.to(device=device, dtype=torch.long)
    lo, hi = labels.min().item(), labels.max().item()
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"`labels` must lie in [0, {n_classes - 1}] (C = {n_classes} classes); "
            f"got values in [{lo}, {hi}]"
        )
    return labels


def _check_probs_labels(probs, labels):
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1], probs.device)
    return probs, labels


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer; got {n_bins!r}")
    return n_bins


def _check_scores(scores, name: str) -> torch.Tensor:
    scores = _as_tensor(scores, name)
    if scores.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D; got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"`{name}` is empty")
    if scores.is_complex():
        raise ValueError(f"`{name}` must be real-valued; got dtype {scores.dtype}")
    scores = scores.to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")
    return scores


# --------------------------------------------------------------------------- #
# accuracy and proper scoring rules
# --------------------------------------------------------------------------- #
def accuracy(probs, labels) -> float:
    r"""Top-1 accuracy.

    .. math:: \mathrm{acc} = \frac1N \sum_{n=1}^N \mathbb 1[\arg\max_c p_{nc} = y_n]

    Ties in ``argmax`` resolve to the first maximal class.
    """
    probs, labels = _check_probs_labels(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def nll(probs, labels, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood of the true class.

    .. math:: \mathrm{NLL} = -\frac1N \sum_{n=1}^N \log \max(p_{n, y_n}, \varepsilon)

    ``eps`` guards against ``log(0)``.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"`eps` must be a positive finite number; got {eps!r}")
    probs, labels = _check_probs_labels(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1).double()
    return (-torch.log(p_true.clamp_min(eps))).mean().item()


def brier(probs, labels) -> float:
    r"""Multi-class Brier score.

    .. math:: \mathrm{BS} = \frac1N \sum_{n=1}^N \sum_{c=1}^C (p_{nc} - \mathbb 1[y_n = c])^2

    Ranges over ``[0, 2]``; 0 for a perfect, fully confident predictor.
    """
    probs, labels = _check_probs_labels(probs, labels)
    p = probs.double()
    onehot = torch.zeros_like(p).scatter_(1, labels[:, None], 1.0)
    return (p - onehot).pow(2).sum(dim=1).mean().item()


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
class ReliabilityDiagram(NamedTuple):
    """Per-bin statistics of a reliability diagram with ``n_bins`` bins.

    Attributes
    ----------
    edges:      ``(n_bins + 1,)`` float64 bin edges ``i / n_bins``; bin ``i`` is
                the half-open interval ``(edges[i], edges[i + 1]]``.
    counts:     ``(n_bins,)`` int64 number of examples per bin.
    confidence: ``(n_bins,)`` float64 mean confidence (max prob) per bin; NaN for
                empty bins.
    accuracy:   ``(n_bins,)`` float64 accuracy per bin; NaN for empty bins.
    """

    edges: torch.Tensor
    counts: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor


def reliability_diagram(probs, labels, n_bins: int = 15) -> ReliabilityDiagram:
    r"""Bin predictions by confidence and compute per-bin accuracy / confidence.

    Confidence is :math:`\mathrm{conf}_n = \max_c p_{nc}` and the prediction is
    :math:`\hat y_n = \arg\max_c p_{nc}`.  Bin :math:`b \in \{0..n\_bins-1\}`
    is :math:`B_b = \{n : b/n\_bins < \mathrm{conf}_n \le (b+1)/n\_bins\}`
    (a confidence of exactly 0, impossible for valid probabilities, falls in bin 0).

    .. math::
        \mathrm{acc}_b = \frac{1}{|B_b|}\sum_{n\in B_b} \mathbb 1[\hat y_n = y_n], \qquad
        \mathrm{conf}_b = \frac{1}{|B_b|}\sum_{n\in B_b} \mathrm{conf}_n

    Empty bins get NaN accuracy and confidence.
    """
    n_bins = _check_n_bins(n_bins)
    probs, labels = _check_probs_labels(probs, labels)
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels).double()

    # Exact i / n_bins (correctly rounded), identical to Python's ``i / n``.
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins
    # bucketize(right=False) on the inner edges returns i with
    # edges[i] < conf <= edges[i + 1], i.e. right-closed bins.
    idx = torch.bucketize(conf, edges[1:-1], right=False)

    counts = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)
    denom = counts.double()
    nan = torch.full_like(denom, float("nan"))
    nonempty = counts > 0
    mean_conf = torch.where(nonempty, conf_sum / denom.clamp_min(1), nan)
    mean_acc = torch.where(nonempty, acc_sum / denom.clamp_min(1), nan)
    return ReliabilityDiagram(edges=edges, counts=counts, confidence=mean_conf, accuracy=mean_acc)


def ece(probs, labels, n_bins: int = 15) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width confidence bins on (0, 1].

    .. math:: \mathrm{ECE} = \sum_{b:\,|B_b|>0} \frac{|B_b|}{N}\,\bigl|\mathrm{acc}_b - \mathrm{conf}_b\bigr|

    with :math:`B_b, \mathrm{acc}_b, \mathrm{conf}_b` as in :func:`reliability_diagram`
    (bin ``b`` covers ``(b/n_bins, (b+1)/n_bins]``, confidence = max prob).
    """
    rd = reliability_diagram(probs, labels, n_bins)
    nonempty = rd.counts > 0
    n = rd.counts.sum().double()
    gaps = (rd.accuracy[nonempty] - rd.confidence[nonempty]).abs()
    return (rd.counts[nonempty].double() / n * gaps).sum().item()


def mce(probs, labels, n_bins: int = 15) -> float:
    r"""Maximum calibration error over non-empty equal-width confidence bins.

    .. math:: \mathrm{MCE} = \max_{b:\,|B_b|>0} \bigl|\mathrm{acc}_b - \mathrm{conf}_b\bigr|

    with bins as in :func:`reliability_diagram`.
    """
    rd = reliability_diagram(probs, labels, n_bins)
    nonempty = rd.counts > 0
    return (rd.accuracy[nonempty] - rd.confidence[nonempty]).abs().max().item()


# --------------------------------------------------------------------------- #
# predictive uncertainty
# --------------------------------------------------------------------------- #
def _entropy(p: torch.Tensor) -> torch.Tensor:
    # -sum_c p log p with the convention 0 log 0 = 0; tiny negative round-off
    # values are clamped to 0 first.
    p = p.clamp_min(0)
    return -torch.xlogy(p, p).sum(dim=-1)


def predictive_entropy(probs) -> torch.Tensor:
    r"""Entropy of the (posterior-)predictive distribution, per example (nats).

    For ``(N, C)`` mean probabilities :math:`\bar p`:

    .. math:: \mathbb H[\bar p_n] = -\sum_c \bar p_{nc} \log \bar p_{nc}

    For ``(S, N, C)`` per-sample probabilities, first
    :math:`\bar p_{nc} = \frac1S \sum_s p_{snc}`.  Uses :math:`0\log 0 = 0`.
    Returns a tensor of shape ``(N,)``.
    """
    probs = _check_probs(probs, "probs", ndims=(2, 3))
    if probs.ndim == 3:
        probs = probs.mean(dim=0)
    return _entropy(probs)


def expected_entropy(sample_probs) -> torch.Tensor:
    r"""Expected entropy (aleatoric part) over posterior samples, per example (nats).

    .. math:: \mathbb E_s \mathbb H[p_s]_n = -\frac1S \sum_{s=1}^S \sum_c p_{snc} \log p_{snc}

    ``sample_probs`` has shape ``(S, N, C)``; returns shape ``(N,)``.
    """
    sample_probs = _check_probs(sample_probs, "sample_probs", ndims=(3,))
    return _entropy(sample_probs).mean(dim=0)


def mutual_information(sample_probs) -> torch.Tensor:
    r"""Mutual information between prediction and parameters (epistemic part; BALD).

    .. math:: \mathrm{MI}_n = \max\Bigl(0,\ \mathbb H\bigl[\tfrac1S\textstyle\sum_s p_{sn}\bigr]
              - \tfrac1S\textstyle\sum_s \mathbb H[p_{sn}]\Bigr)

    i.e. ``predictive_entropy - expected_entropy`` clamped at 0 (it is
    non-negative mathematically; the clamp removes round-off).
    ``sample_probs`` has shape ``(S, N, C)``; returns shape ``(N,)``.
    """
    sample_probs = _check_probs(sample_probs, "sample_probs", ndims=(3,))
    mi = _entropy(sample_probs.mean(dim=0)) - _entropy(sample_probs).mean(dim=0)
    return mi.clamp_min(0)


# --------------------------------------------------------------------------- #
# OOD detection
# --------------------------------------------------------------------------- #
def auroc(scores_in, scores_out) -> float:
    r"""Area under the ROC curve for OOD detection (OOD = positive class,
    higher score = more OOD).

    .. math:: \mathrm{AUROC} = \frac{1}{nm}\sum_{i=1}^{n}\sum_{j=1}^{m}
              \Bigl(\mathbb 1[s^{out}_j > s^{in}_i] + \tfrac12 \mathbb 1[s^{out}_j = s^{in}_i]\Bigr)

    (the Mann-Whitney U statistic divided by ``n m``).  Computed in
    :math:`O((n+m)\log n)` by sorting the in-distribution scores and locating
    each OOD score's rank with ``searchsorted``; the pair counts are exact
    integers.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out").to(s_in.device)
    sorted_in, _ = torch.sort(s_in)
    n_less = torch.searchsorted(sorted_in, s_out, right=False)  # #{in < s}
    n_leq = torch.searchsorted(sorted_in, s_out, right=True)  # #{in <= s}
    twice_u = (n_less + n_leq).sum().item()  # 2 * (#greater + 0.5 * #ties), exact int
    return twice_u / (2.0 * s_in.numel() * s_out.numel())


def fpr_at_95_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    r"""False-positive rate at 95 % true-positive rate (OOD = positive class,
    higher score = more OOD).

    The threshold is the largest :math:`t` detecting at least ``tpr`` of the
    OOD examples, :math:`t^* = \max\{t : \frac1m\sum_j \mathbb 1[s^{out}_j \ge t] \ge 0.95\}`,
    which is the :math:`k`-th largest OOD score with :math:`k = \lceil 0.95\,m \rceil`.

    .. math:: \mathrm{FPR@95} = \frac1n \sum_{i=1}^n \mathbb 1[s^{in}_i \ge t^*]

    ``tpr`` (default 0.95) may be changed to get FPR at another TPR level.
    """
    if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
        raise ValueError(f"`tpr` must be in (0, 1]; got {tpr!r}")
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out").to(s_in.device)
    m = s_out.numel()
    # round() guards against e.g. 0.95 * 20 = 18.999999999999996
    k = min(m, max(1, math.ceil(round(tpr * m, 9))))
    threshold = torch.sort(s_out, descending=True).values[k - 1]
    return (s_in >= threshold).double().mean().item()
