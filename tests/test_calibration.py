"""kfacvi calibrate: a Kronecker Laplace posterior around a run trained with --validation, its
prior variance chosen on the held-out images, the test set evaluated once afterwards."""
import json

import pytest
import torch

from pyro_kfacvi import KroneckerNormal
from pyro_kfacvi.experiments import cli
from pyro_kfacvi.experiments.calibration import PRIOR_VARIANCES
from pyro_kfacvi.experiments.data import CIFAR10, Split
from pyro_kfacvi.experiments.evaluation import eval_seed, evaluate
from pyro_kfacvi.experiments.training import Trainer
from test_training import TINY, fake_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path, monkeypatch):
    fake = fake_data(n_train=256)
    data = CIFAR10(fake.train, fake.test)
    monkeypatch.setattr(cli, "_load_data", lambda args: data)
    monkeypatch.setitem(cli.PRESETS, "tiny", TINY.replace(optimizer="kfac", rho=None, mc_samples=1, epochs=2))
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--validation", "64", "--out", str(out), "--no-progress"]) == 0
    return out, data


def test_calibrate_chooses_eta_on_the_held_out_images_and_reports_the_test_set(run, tmp_path, capsys):
    out, data = run
    capsys.readouterr()
    assert cli.main(["calibrate", "--checkpoint", str(out), "--out", str(tmp_path / "cal"), "--test-samples", "4"]) == 0
    result = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    trained = json.loads((tmp_path / "cal" / "trained" / "metrics.json").read_text())
    calibration = result["calibration"]
    rows = calibration["grid"]
    assert [row["prior_variance"] for row in rows] == list(PRIOR_VARIANCES)
    assert calibration["prior_variance"] == min(rows, key=lambda row: row["validation_nll"])["prior_variance"]
    assert calibration["validation_size"] == 64 and result["config"]["seed"] == 0

    # independently: the held-out images are the last 64 training images, the test set is the test set
    trainer = Trainer.from_checkpoint(out, data)
    held_out = Split(data.train.images[-64:], data.train.labels[-64:])
    seed = eval_seed(0, None)
    posterior = KroneckerNormal.from_guide(trainer.guide)
    trainer.model.prior_variance = rows[3]["prior_variance"]
    assert evaluate(trainer.model, posterior, held_out, 4, seed, "validation_")["validation_nll"] == \
        pytest.approx(rows[3]["validation_nll"], rel=1e-6)
    trainer.model.prior_variance = calibration["prior_variance"]
    expected = evaluate(trainer.model, posterior, data.test, 4, seed, "test_")
    assert result["final"]["test_nll"] == pytest.approx(expected["test_nll"], rel=1e-6)
    assert result["final"]["test_acc"] == expected["test_acc"]
    # the K-FAC guide as trained is a point mass: its test metrics are the mean network's
    point = evaluate(trainer.model, trainer.guide, data.test, 0, seed, "test_")
    assert metrics_equal(trained["final"], point)
    assert trained["final"]["test_samples"] == 0


def metrics_equal(final, expected):
    return all(final[key] == pytest.approx(value, rel=1e-9) for key, value in expected.items())


def test_a_vanishing_prior_variance_leaves_the_point_estimate(run):
    """η → 0: Σ = (1/N)(F̂ + I/(Nη))⁻¹ → ηI, so the Laplace predictive becomes the point estimate's."""
    out, data = run
    trainer = Trainer.from_checkpoint(out, data)
    posterior = KroneckerNormal.from_guide(trainer.guide)
    trainer.model.prior_variance = 1e-12
    laplace = evaluate(trainer.model, posterior, data.test, 4, 0, "")
    point = evaluate(trainer.model, trainer.guide, data.test, 0, 0, "")
    assert laplace["nll"] == pytest.approx(point["nll"], rel=1e-5)
    trainer.model.prior_variance = 1.0  # a wide prior spreads the predictive: another NLL
    assert evaluate(trainer.model, posterior, data.test, 4, 0, "")["nll"] != pytest.approx(point["nll"], rel=1e-3)


def test_a_run_trained_on_every_image_is_refused(tmp_path, monkeypatch, capsys):
    fake = fake_data()
    data = CIFAR10(fake.train, fake.test)
    monkeypatch.setattr(cli, "_load_data", lambda args: data)
    monkeypatch.setitem(cli.PRESETS, "tiny", TINY.replace(optimizer="kfac", rho=None, mc_samples=1, epochs=1))
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--checkpoint", str(out), "--out", str(tmp_path / "cal")])
    assert "--validation N" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_analyze_uses_the_laplace_posterior_with_the_given_prior_variance(run, tmp_path):
    from pyro_kfacvi import Predictive
    from pyro_kfacvi.experiments import analysis
    from pyro_kfacvi.experiments.evaluation import private_rng

    out, data = run
    x = data.test.images[:8]
    point, info = analysis.load_predictor(out, data, num_samples=4)
    assert "posterior" not in info
    eta = 1e-2
    laplace, info = analysis.load_predictor(out, data, num_samples=4, laplace_prior_variance=eta)
    assert info["posterior"] == "kronecker-laplace" and info["prior_variance"] == eta
    trainer = Trainer.from_checkpoint(out, data)
    trainer.model.prior_variance = eta
    reference = Predictive(trainer.model, KroneckerNormal.from_guide(trainer.guide), 4)
    with private_rng(3):
        got = laplace(x)
    with private_rng(3):
        expected = reference.samples(x)
    assert got.shape == (4, 8, 10)
    torch.testing.assert_close(got, expected)
    assert (got - point(x)).abs().max() > 1e-3  # weights drawn around μ, not the point mass
    # a prior this narrow (π = 1/(Nη) ≫ F̂) collapses Σ onto μ: the point's predictions
    collapsed, _ = analysis.load_predictor(out, data, num_samples=4, laplace_prior_variance=1e-14)
    torch.testing.assert_close(collapsed(x), point(x).expand(4, -1, -1), atol=1e-5, rtol=0)


def test_analyze_refuses_a_laplace_posterior_for_a_baseline(tmp_path, monkeypatch):
    from pyro_kfacvi.experiments import analysis, baselines
    from test_analysis import TINY_BASELINE

    data = fake_data()
    baselines.train(baselines.BaselineConfig(method="adam", **TINY_BASELINE), data, tmp_path / "adam", log=None)
    with pytest.raises(ValueError, match="baseline run"):
        analysis.load_predictor(tmp_path / "adam", data, laplace_prior_variance=1e-2)
