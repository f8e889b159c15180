"""The uncertainty analysis (pyro_kfacvi.experiments.analysis, plots), the baselines and their CLI commands."""
import json
from types import SimpleNamespace

import pyro
import pytest
import torch

from pyro_kfacvi import metrics
from pyro_kfacvi.experiments import analysis, baselines, cli, peers
from pyro_kfacvi.experiments.data import Split, normalize
from pyro_kfacvi.experiments.ood import ood_sets
from pyro_kfacvi.experiments.presets import PRESETS
from pyro_kfacvi.experiments.shift import CORRUPTIONS
from pyro_kfacvi.experiments.training import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_data(n_train=128, n_test=64, seed=0):
    """Random normalised CIFAR-shaped images whose label is the sign pattern of two channel means."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, 3, 32, 32, generator=g)
        return Split(x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long())

    return SimpleNamespace(train=split(n_train), test=split(n_test))


TINY_NET = {"channels": (4, 8), "hidden": (16, 16)}
TINY_BASELINE = dict(epochs=1, batch_size=32, test_samples=4, train_eval_size=32, **TINY_NET)


def toy_predict(x):
    """Three 'posterior samples' of a softmax regression on the channel means; sharper for
    images whose neighbouring pixels agree (natural images) than for noise."""
    smooth = 1 / (1 + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)))
    logits = torch.stack([x[:, c].mean((1, 2)) for c in range(3)] + [torch.zeros(len(x))], -1)
    return torch.stack([(scale * 4 * smooth[:, None] * logits).softmax(-1) for scale in (0.5, 1.0, 2.0)])


def test_histogram_counts_like_a_loop():
    values = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.99, 1.0, 0.3])
    edges = torch.linspace(0, 1, 5)
    expected = [sum(1 for v in values if lo <= v < hi or (i == 3 and v == hi))
                for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    assert analysis.histogram(values, edges) == expected == [2, 2, 1, 2]


def test_calibration_is_the_metrics_of_the_mean_prediction():
    g = torch.Generator().manual_seed(0)
    sample_probs = torch.rand(5, 200, 4, generator=g).softmax(-1)
    labels = torch.randint(0, 4, (200,), generator=g)
    mean = sample_probs.double().mean(0)
    result = analysis.calibration(sample_probs, labels)
    assert result == pytest.approx({"acc": metrics.accuracy(mean, labels), "nll": metrics.nll(mean, labels),
                                    "brier": metrics.brier(mean, labels), "ece": metrics.ece(mean, labels),
                                    "mce": metrics.mce(mean, labels)})


def test_analyze_reports_calibration_shift_and_ood():
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(96, 3, 8, 8, generator=g)
    raw = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    labels = toy_predict(normalize(raw)).mean(0).argmax(-1)
    labels[::4] = 3  # a quarter of the predictions wrong
    sets = ood_sets(raw, 48, seed=0, fashion_root="/nonexistent")
    report = analysis.analyze(toy_predict, raw, labels, sets, shift_size=32, seed=0)

    probs = toy_predict(normalize(raw))
    assert report["num_samples"] == 3 and report["shift_size"] == 32
    assert report["test"]["acc"] == pytest.approx(0.75)
    assert report["test"]["ece"] == pytest.approx(metrics.ece(probs.double().mean(0), labels))
    assert len(report["shift"]) == 5 * len(CORRUPTIONS)
    assert report["summary"]["shift_ece"] == pytest.approx(sum(r["ece"] for r in report["shift"]) / 25)
    assert sum(report["confidence_histogram"]["correct"]) == 72
    assert sum(report["reliability"]["counts"]) == 96
    noise_probs = toy_predict(normalize(sets["uniform_noise"])).double()
    for score, reference in (("entropy", metrics.predictive_entropy), ("mutual_information", metrics.mutual_information)):
        assert report["ood"]["uniform_noise"][f"auroc_{score}"] == pytest.approx(
            metrics.auroc(reference(probs.double()), reference(noise_probs)))
        assert report["ood"]["uniform_noise"][f"fpr95_{score}"] == pytest.approx(
            metrics.fpr_at_95_tpr(reference(probs.double()), reference(noise_probs)))
    assert report["ood"]["uniform_noise"]["auroc_entropy"] > 0.95  # noise is rough: flat predictions
    for score in ("entropy", "mutual_information"):
        hist = report["score_histograms"][score]
        assert sum(hist["cifar10_test"]) == 96 and sum(hist["permuted_cifar10"]) == 48
    json.dumps(report)  # JSON-ready


@pytest.mark.parametrize("method", list(baselines.METHODS))
def test_baseline_trains_saves_and_restores(tmp_path, method):
    if method in peers.PACKAGES:  # the optional extra [peers]
        pytest.importorskip(peers.PACKAGES[method][0])
    data = fake_data()
    config = baselines.BaselineConfig(method=method, **TINY_BASELINE)
    history, final = baselines.train(config, data, out_dir=tmp_path, log=None)
    assert len(history) == 1 and 0 <= final["test_acc"] <= 1
    restored_config, method_obj = baselines.from_checkpoint(tmp_path / "checkpoint.pt", data.test.images[:1])
    assert restored_config == config
    x = data.test.images[:10]
    torch.manual_seed(3)
    samples = method_obj.samples(x, 4)
    expected_samples = 1 if method in ("adam", "sgd") else 4
    assert samples.shape == (expected_samples, 10, 10)
    torch.testing.assert_close(samples.sum(-1), torch.ones(expected_samples, 10))
    if expected_samples > 1:  # the samples differ, and a seed reproduces them
        assert (samples[0] - samples[1]).abs().max() > 1e-4
        torch.manual_seed(3)
        torch.testing.assert_close(method_obj.samples(x, 4), samples)
    # the S-sample predictive of the restored method reproduces the run's final test NLL
    torch.manual_seed(config.seed)
    probs = method_obj.samples(data.test.images, config.test_samples).double().mean(0)
    assert metrics.nll(probs, data.test.labels) == pytest.approx(final["test_nll"], rel=1e-5)


def test_mean_field_starts_at_the_network_and_its_median_is_the_mean():
    torch.manual_seed(0)
    config = baselines.BaselineConfig(method="mean-field", init_scale=1e-6, **TINY_BASELINE)
    method = baselines.build(config, torch.zeros(1, 3, 32, 32), num_data=100)
    x = torch.randn(5, 3, 32, 32)
    net_probs = method.model.net.eval()(x).softmax(-1)
    torch.testing.assert_close(method.samples(x, 0)[0], net_probs)
    torch.testing.assert_close(method.samples(x, 3), net_probs.expand(3, -1, -1), atol=1e-4, rtol=0)
    pyro.clear_param_store()


def test_analyze_checkpoint_writes_report_and_figures_for_both_kinds(tmp_path):
    data = fake_data()
    config = PRESETS["quick"].replace(epochs=1, batch_size=32, train_subset=None, mc_samples=2, test_samples=3,
                                      train_eval_size=32, inverse_every=2, **TINY_NET)
    Trainer(config, data, out_dir=tmp_path / "kfacvi", progress=False, log=None).run()
    baselines.train(baselines.BaselineConfig(method="mc-dropout", **TINY_BASELINE), data, tmp_path / "mcd", log=None)
    for run in ("kfacvi", "mcd"):
        report = analysis.analyze_checkpoint(tmp_path / run, data, tmp_path / f"{run}-analysis", num_samples=3,
                                             shift_size=16, ood_size=16, fashion_mnist="/nonexistent")
        written = json.loads((tmp_path / f"{run}-analysis" / "report.json").read_text())
        assert written["summary"] == pytest.approx(report["summary"])
        assert written["num_samples"] == 3 and written["test_samples"] == 3
        trained = json.loads((tmp_path / run / "metrics.json").read_text())
        assert written["run"] == {"config": trained["config"], "final": trained["final"]}
        for figure in ("reliability.png", "confidence.png", "entropy.png", "shift.png"):
            assert (tmp_path / f"{run}-analysis" / figure).read_bytes()[:4] == b"\x89PNG"
    # K-FAC's point mass draws one sample whatever S is asked for
    predict, info = analysis.load_predictor(tmp_path / "kfacvi", data, num_samples=0)
    assert predict(data.test.images[:5]).shape == (1, 5, 10) and info["method"] == "kfacvi"


def test_cli_parses_baseline_and_analyze():
    parser = cli.build_parser()
    args = parser.parse_args(["baseline", "--method", "mc-dropout", "--dropout", "0.1", "--epochs", "2", "--out", "x"])
    assert baselines.BaselineConfig(**cli.overrides(args)) == baselines.BaselineConfig(
        method="mc-dropout", dropout=0.1, epochs=2)
    args = parser.parse_args(["analyze", "--checkpoint", "runs/a", "--out", "runs/a/analysis", "--test-samples", "10"])
    assert (args.test_samples, args.shift_size, args.ood_size, args.seed) == (10, 2000, 2000, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["baseline", "--method", "bayes-by-magic", "--out", "x"])
