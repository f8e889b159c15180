"""Tests for pyro_kfacvi.metrics against independent brute-force references."""

import math

import numpy as np
import pytest
import torch

from pyro_kfacvi import metrics as M


# --------------------------------------------------------------------------- #
# helpers / brute-force references (plain Python loops over numpy arrays)
# --------------------------------------------------------------------------- #
def _random_probs(rng, n, c, concentration=1.0):
    return rng.dirichlet(np.full(c, concentration), size=n)


def _sample_labels(rng, probs):
    """Draw y_n ~ Categorical(probs[n]) (vectorised inverse-CDF)."""
    u = rng.random((probs.shape[0], 1))
    y = (probs.cumsum(axis=1) < u).sum(axis=1)
    return np.minimum(y, probs.shape[1] - 1)


def ref_accuracy(p, y):
    hits = 0
    for n in range(len(y)):
        best = 0
        for c in range(p.shape[1]):
            if p[n, c] > p[n, best]:
                best = c
        hits += best == y[n]
    return hits / len(y)


def ref_nll(p, y, eps=1e-12):
    return sum(-math.log(max(p[n, y[n]], eps)) for n in range(len(y))) / len(y)


def ref_brier(p, y):
    total = 0.0
    for n in range(len(y)):
        for c in range(p.shape[1]):
            total += (p[n, c] - (1.0 if c == y[n] else 0.0)) ** 2
    return total / len(y)


def ref_bins(p, y, n_bins):
    """Per-bin (count, mean conf, acc) with bins (b/n, (b+1)/n]."""
    conf = [max(row) for row in p]
    pred = [int(np.argmax(row)) for row in p]
    out = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(y)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            mc = sum(conf[i] for i in members) / len(members)
            ma = sum(pred[i] == y[i] for i in members) / len(members)
        else:
            mc = ma = float("nan")
        out.append((len(members), mc, ma))
    return out


def ref_ece(p, y, n_bins):
    return sum(cnt / len(y) * abs(a - c) for cnt, c, a in ref_bins(p, y, n_bins) if cnt)


def ref_mce(p, y, n_bins):
    return max(abs(a - c) for cnt, c, a in ref_bins(p, y, n_bins) if cnt)


def ref_entropy(row):
    return -sum(q * math.log(q) for q in row if q > 0)


def ref_auroc(s_in, s_out):
    total = 0.0
    for o in s_out:
        for i in s_in:
            total += 1.0 if o > i else (0.5 if o == i else 0.0)
    return total / (len(s_in) * len(s_out))


def ref_fpr95(s_in, s_out):
    # largest candidate threshold (an OOD score) that detects >= 95% of OOD
    best = None
    for t in sorted(set(s_out)):
        detected = sum(1 for o in s_out if o >= t)
        if detected >= 0.95 * len(s_out) - 1e-9:
            best = t
    return sum(1 for i in s_in if i >= best) / len(s_in)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- #
# accuracy / NLL / Brier
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_scores_match_reference(rng, dtype):
    p = _random_probs(rng, 300, 5, concentration=0.5)
    y = rng.integers(0, 5, size=300)
    pt, yt = torch.tensor(p, dtype=dtype), torch.tensor(y)
    p_cast = pt.double().numpy()  # reference sees the same rounded values
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for fn, ref in [(M.accuracy, ref_accuracy), (M.nll, ref_nll), (M.brier, ref_brier)]:
        got = fn(pt, yt)
        assert isinstance(got, float)
        assert got == pytest.approx(ref(p_cast, y), abs=tol, rel=tol)


def test_nll_eps_and_zero_prob():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert M.nll(p, y) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)
    assert M.nll(p, y, eps=1e-3) == pytest.approx((-math.log(1e-3) + math.log(2)) / 2)


def test_perfect_prediction():
    y = torch.tensor([0, 2, 1, 2, 0])
    p = torch.nn.functional.one_hot(y, 3).double()
    assert M.brier(p, y) == 0.0
    assert M.accuracy(p, y) == 1.0
    assert M.nll(p, y) == pytest.approx(0.0, abs=1e-12)
    assert M.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    # fully wrong and confident: Brier = 2
    assert M.brier(p, (y + 1) % 3) == pytest.approx(2.0)


def test_accepts_numpy_and_float_labels(rng):
    p = _random_probs(rng, 50, 4)
    y = rng.integers(0, 4, size=50)
    assert M.accuracy(p, y) == pytest.approx(ref_accuracy(p, y))
    assert M.accuracy(torch.tensor(p), torch.tensor(y, dtype=torch.float32)) == pytest.approx(
        ref_accuracy(p, y)
    )


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_mce_reliability_match_reference(rng, n_bins):
    p = _random_probs(rng, 400, 4, concentration=0.3)
    y = _sample_labels(rng, p)
    pt, yt = torch.tensor(p), torch.tensor(y)
    assert M.ece(pt, yt, n_bins) == pytest.approx(ref_ece(p, y, n_bins), abs=1e-12)
    assert M.mce(pt, yt, n_bins) == pytest.approx(ref_mce(p, y, n_bins), abs=1e-12)

    rd = M.reliability_diagram(pt, yt, n_bins)
    ref = ref_bins(p, y, n_bins)
    assert rd.edges.shape == (n_bins + 1,)
    assert rd.edges[0] == 0.0 and rd.edges[-1] == 1.0
    assert rd.counts.tolist() == [r[0] for r in ref]
    assert int(rd.counts.sum()) == 400
    np.testing.assert_allclose(rd.confidence.numpy(), [r[1] for r in ref], atol=1e-12)
    np.testing.assert_allclose(rd.accuracy.numpy(), [r[2] for r in ref], atol=1e-12)


def test_bins_are_right_closed():
    # confidences exactly on edges 0.6, 0.8, 1.0 with n_bins=5 must fall in bins 2, 3, 4
    p = torch.tensor([[0.6, 0.4], [0.8, 0.2], [1.0, 0.0], [0.4, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    rd = M.reliability_diagram(p, y, n_bins=5)
    assert rd.counts.tolist() == [0, 0, 2, 1, 1]  # 0.6 twice, 0.8, 1.0
    assert math.isnan(rd.confidence[0]) and math.isnan(rd.accuracy[1])
    assert rd.accuracy[2].item() == 1.0 and rd.accuracy[3].item() == 0.0
    assert M.ece(p, y, 5) == pytest.approx(ref_ece(p.numpy(), y.numpy(), 5))
    assert M.mce(p, y, 5) == pytest.approx(0.8)


def test_ece_calibrated_predictor_near_zero(rng):
    p = _random_probs(rng, 200_000, 10, concentration=0.5)
    y = _sample_labels(rng, p)  # labels drawn from the predicted probabilities
    assert M.ece(torch.tensor(p), torch.tensor(y)) < 0.01


def test_ece_overconfident_predictor_positive(rng):
    p = _random_probs(rng, 20_000, 10, concentration=0.5)
    y = _sample_labels(rng, p)
    sharp = p**4
    sharp /= sharp.sum(axis=1, keepdims=True)  # same argmax, inflated confidence
    e_cal = M.ece(torch.tensor(p), torch.tensor(y))
    e_over = M.ece(torch.tensor(sharp), torch.tensor(y))
    assert e_over > 0.05
    assert e_over > 3 * e_cal
    assert M.mce(torch.tensor(sharp), torch.tensor(y)) >= e_over


# --------------------------------------------------------------------------- #
# entropies / mutual information
# --------------------------------------------------------------------------- #
def test_entropies_match_reference(rng):
    S, N, C = 7, 30, 4
    sp = rng.dirichlet(np.full(C, 0.7), size=(S, N))
    sp[0, 0] = [1.0, 0.0, 0.0, 0.0]  # exercise 0 log 0
    spt = torch.tensor(sp)
    mean = sp.mean(axis=0)
    ref_pe = [ref_entropy(mean[n]) for n in range(N)]
    ref_ee = [sum(ref_entropy(sp[s, n]) for s in range(S)) / S for n in range(N)]

    pe3 = M.predictive_entropy(spt)
    pe2 = M.predictive_entropy(spt.mean(0))
    ee = M.expected_entropy(spt)
    mi = M.mutual_information(spt)
    for t in (pe3, pe2, ee, mi):
        assert isinstance(t, torch.Tensor) and t.shape == (N,)
    np.testing.assert_allclose(pe3.numpy(), ref_pe, atol=1e-12)
    np.testing.assert_allclose(pe2.numpy(), ref_pe, atol=1e-12)
    np.testing.assert_allclose(ee.numpy(), ref_ee, atol=1e-12)
    np.testing.assert_allclose(mi.numpy(), np.array(ref_pe) - np.array(ref_ee), atol=1e-12)
    assert (mi >= 0).all()


def test_entropy_extremes():
    uniform = torch.full((3, 5), 0.2)
    np.testing.assert_allclose(M.predictive_entropy(uniform).numpy(), math.log(5), rtol=1e-6)
    onehot = torch.eye(4)
    assert torch.equal(M.predictive_entropy(onehot), torch.zeros(4))


def test_mi_identical_samples_is_zero(rng):
    p = torch.tensor(_random_probs(rng, 25, 6), dtype=torch.float32)
    sp = p.expand(9, -1, -1)
    mi = M.mutual_information(sp)
    assert (mi >= 0).all()
    assert mi.abs().max().item() < 1e-6
    np.testing.assert_allclose(
        M.expected_entropy(sp).numpy(), M.predictive_entropy(p).numpy(), atol=1e-6
    )


def test_mi_disagreeing_confident_samples():
    # two confident samples that disagree: MI = log 2, expected entropy = 0
    sp = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert M.expected_entropy(sp).item() == pytest.approx(0.0)
    assert M.mutual_information(sp).item() == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------- #
# OOD detection
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tied", [False, True])
def test_auroc_matches_pairwise(rng, tied):
    if tied:
        s_in = rng.integers(0, 6, size=150).astype(float)
        s_out = rng.integers(2, 8, size=120).astype(float)
    else:
        s_in = rng.normal(0, 1, 150)
        s_out = rng.normal(0.7, 1, 120)
    got = M.auroc(torch.tensor(s_in), torch.tensor(s_out))
    assert isinstance(got, float)
    assert got == pytest.approx(ref_auroc(s_in.tolist(), s_out.tolist()), abs=1e-12)


def test_auroc_properties(rng):
    s_in = torch.tensor(rng.normal(0, 1, 500))
    assert M.auroc(s_in, s_in + 100) == 1.0
    assert M.auroc(s_in + 100, s_in) == 0.0
    assert M.auroc(torch.zeros(10), torch.zeros(7)) == 0.5  # all ties
    same = M.auroc(torch.tensor(rng.normal(0, 1, 5000)), torch.tensor(rng.normal(0, 1, 5000)))
    assert abs(same - 0.5) < 0.03
    # antisymmetry: AUROC(a, b) = 1 - AUROC(b, a)
    a, b = torch.tensor(rng.normal(0, 1, 300)), torch.tensor(rng.normal(0.3, 1, 200))
    assert M.auroc(a, b) == pytest.approx(1 - M.auroc(b, a), abs=1e-12)


@pytest.mark.parametrize("m", [1, 7, 20, 100, 133])
def test_fpr95_matches_reference(rng, m):
    for tied in (False, True):
        if tied:
            s_in = rng.integers(0, 10, size=90).astype(float)
            s_out = rng.integers(3, 12, size=m).astype(float)
        else:
            s_in = rng.normal(0, 1, 90)
            s_out = rng.normal(1.5, 1, m)
        got = M.fpr_at_95_tpr(torch.tensor(s_in), torch.tensor(s_out))
        assert isinstance(got, float)
        assert got == pytest.approx(ref_fpr95(s_in.tolist(), s_out.tolist()), abs=1e-12)


def test_fpr95_properties(rng):
    s_in = torch.tensor(rng.normal(0, 1, 400))
    assert M.fpr_at_95_tpr(s_in, s_in + 100) == 0.0
    assert M.fpr_at_95_tpr(s_in + 100, s_in) == 1.0
    # identical distributions: FPR ~ TPR ~ 0.95
    big_in, big_out = rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000)
    assert abs(M.fpr_at_95_tpr(torch.tensor(big_in), torch.tensor(big_out)) - 0.95) < 0.01
    # exact small example: 20 OOD scores 1..20 -> threshold = 2 (19/20 detected)
    s_out = torch.arange(1.0, 21.0)
    s_in = torch.tensor([0.0, 1.0, 1.5, 2.0, 3.0])
    assert M.fpr_at_95_tpr(s_in, s_out) == pytest.approx(2 / 5)


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
P = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
Y = torch.tensor([0, 1])
CLASSIFICATION = [M.accuracy, M.nll, M.brier, M.ece, M.mce, M.reliability_diagram]


@pytest.mark.parametrize("fn", CLASSIFICATION)
@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.tensor([0.7, 0.3]), Y, r"shape \(N, C\)"),
        (P[None], Y, r"shape \(N, C\)"),
        (P, torch.tensor([0, 1, 1]), "length 3 .* 2 rows"),
        (P, Y[:, None], r"labels.*shape \(N,\)"),
        (torch.empty(0, 2), torch.empty(0, dtype=torch.long), "empty"),
        (torch.tensor([[0.7, float("nan")], [0.2, 0.8]]), Y, "non-finite"),
        (torch.tensor([[0.7, 0.3], [float("inf"), 0.8]]), Y, "non-finite"),
        (P, torch.tensor([0, 2]), r"labels.*\[0, 1\]"),
        (P, torch.tensor([-1, 0]), r"labels.*\[0, 1\]"),
        (P, torch.tensor([0.0, 0.5]), "integer"),
        (torch.tensor([[2.0, -1.0], [0.2, 0.8]]), Y, r"\[0, 1\].*logits"),
        (torch.tensor([[0.5, 0.3], [0.2, 0.8]]), Y, "sum to 1"),
        (torch.tensor([[1, 0], [0, 1]]), Y, "floating-point"),
    ],
)
def test_classification_validation(fn, probs, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, labels)


@pytest.mark.parametrize("fn", [M.ece, M.mce, M.reliability_diagram])
@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_bad_n_bins(fn, n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        fn(P, Y, n_bins=n_bins)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        M.nll(P, Y, eps=0.0)


def test_uncertainty_validation():
    with pytest.raises(ValueError, match=r"\(N, C\) or \(S, N, C\)"):
        M.predictive_entropy(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        M.expected_entropy(P)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        M.mutual_information(P)
    with pytest.raises(ValueError, match="empty"):
        M.mutual_information(torch.empty(0, 3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        M.expected_entropy(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(ValueError, match="sum to 1"):
        M.predictive_entropy(torch.tensor([[0.9, 0.9]]))


@pytest.mark.parametrize("fn", [M.auroc, M.fpr_at_95_tpr])
def test_ood_validation(fn):
    ok = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores_in.*empty"):
        fn(torch.tensor([]), ok)
    with pytest.raises(ValueError, match="scores_out.*empty"):
        fn(ok, torch.tensor([]))
    with pytest.raises(ValueError, match="scores_in.*1-D"):
        fn(ok[:, None], ok)
    with pytest.raises(ValueError, match="scores_out.*non-finite"):
        fn(ok, torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="scores_in.*non-finite"):
        fn(torch.tensor([float("-inf")]), ok)


def test_fpr_bad_tpr():
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_95_tpr(torch.ones(3), torch.ones(3), tpr=0.0)
