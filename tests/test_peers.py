"""The peers as baselines (pyro_kfacvi.experiments.peers): IVON and Kronecker Laplace through
``kfacvi baseline`` and ``kfacvi analyze`` on tiny fake data, their hyperparameters and
checkpoints, and the install hint when their packages are missing."""
import json
import math
import sys

import pytest
import torch

from pyro_kfacvi.experiments import analysis, baselines, cli, peers
from test_analysis import TINY_BASELINE, TINY_NET, fake_data

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FLAGS = ["--epochs", "1", "--batch-size", "32", "--test-samples", "3", "--train-eval-size", "32",
              "--channels", "4,8", "--hidden", "16,16"]


def needs(method):
    """Skip unless the package of the peer ``method`` is installed (the optional extra [peers])."""
    pytest.importorskip(peers.PACKAGES[method][0])


@pytest.mark.parametrize("method", list(peers.PACKAGES))
def test_peer_runs_through_kfacvi_baseline_and_analyze(method, tmp_path, monkeypatch):
    """``kfacvi baseline --method ivon|laplace`` writes the run folder of the other methods, and
    ``kfacvi analyze`` and ``load_predictor`` read it: per-sample probabilities ``(S, N, C)``."""
    needs(method)
    data = fake_data()
    monkeypatch.setattr(cli, "_load_data", lambda args: data)
    run = tmp_path / "run"
    assert cli.main(["baseline", "--method", method, "--out", str(run), *TINY_FLAGS]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and len(metrics["epochs"]) == 1
    assert 0 <= metrics["final"]["test_acc"] <= 1 and metrics["final"]["test_samples"] == 3
    assert (run / "checkpoint.pt").is_file()

    assert cli.main(["analyze", "--checkpoint", str(run), "--out", str(tmp_path / "analysis"), "--test-samples", "2",
                     "--shift-size", "8", "--ood-size", "8", "--fashion-mnist", "/nonexistent"]) == 0
    report = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert report["method"] == method and report["num_samples"] == 2 and len(report["shift"]) == 25

    x = data.test.images[:10]
    for samples, expected in ((0, 1), (3, 3)):  # laplace: GLM-probit (S = 1) and MC; ivon: mean and draws
        predict, info = analysis.load_predictor(run, data, num_samples=samples)
        probs = predict(x)
        assert probs.shape == (expected, 10, 10) and info["test_samples"] == samples
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(expected, 10))
        assert math.isfinite(analysis.calibration(probs, data.test.labels[:10])["nll"])


def test_laplace_fits_the_adam_network_with_a_scalar_prior_at_the_marginal_likelihood_maximum(tmp_path):
    """The MAP network is the adam baseline's (same history); δ is one scalar at a stationary point of
    the log marginal likelihood; the GLM-probit predictive in blocks of GLM_ROWS equals the package's
    one-call predictive; MC sampling leaves the weights at θ_MAP."""
    needs("laplace")
    data = fake_data()
    adam_history, _ = baselines.train(baselines.BaselineConfig(method="adam", **TINY_BASELINE), data, log=None)
    config = baselines.BaselineConfig(method="laplace", **TINY_BASELINE)
    history, final = baselines.train(config, data, out_dir=tmp_path, log=None)
    for mine, adam in zip(history, adam_history, strict=True):
        assert {k: v for k, v in mine.items() if k != "time"} == {k: v for k, v in adam.items() if k != "time"}

    _, method = baselines.from_checkpoint(tmp_path, data.test.images[:1])
    laplace = method.laplace
    assert laplace.prior_precision.shape == (1,) and final["prior_precision"] == pytest.approx(laplace.prior_precision.item())
    log_delta = laplace.prior_precision.log().requires_grad_()
    slope, = torch.autograd.grad(laplace.log_marginal_likelihood(prior_precision=log_delta.exp()), log_delta)
    assert abs(slope.item()) < 1e-2
    with torch.no_grad():
        at = [laplace.log_marginal_likelihood(prior_precision=laplace.prior_precision * f).item() for f in (1, 1.2, 1 / 1.2)]
    assert at[0] >= max(at[1:])

    x = data.test.images[:2 * peers.GLM_ROWS + 3]
    glm = method.samples(x, 0)
    torch.testing.assert_close(glm[0], laplace(x, pred_type="glm", link_approx="probit"))
    assert final["glm_probit_test_nll"] == pytest.approx(analysis.calibration(method.samples(data.test.images, 0),
                                                                              data.test.labels)["nll"], rel=1e-5)
    method.samples(x, 2)
    torch.testing.assert_close(torch.cat([p.flatten() for p in method.map.net.parameters()]), laplace.mean)


def test_ivon_defaults_are_its_authors_cifar_settings_and_its_state_round_trips():
    """lr 0.2 with a cosine decay to 0 over all steps, h0 = 0.5, δ = 2e-4, β2 = 0.99999, λ = N; a
    restored IVON (Hessian, momentum, step count, schedule) draws the same predictive samples."""
    needs("ivon")
    config = baselines.BaselineConfig(method="ivon", epochs=2, batch_size=32, **TINY_NET)
    assert (config.learning_rate, config.decay, config.hess_init, config.beta2, config.momentum) == (
        0.2, 2e-4, 0.5, 0.99999, 0.9)
    data = fake_data(n_train=100)
    torch.manual_seed(0)
    method = baselines.build(config, data.train.images[:1], num_data=100)
    group = method.optimizer.param_groups[0]
    assert (group["ess"], group["hess_init"], group["weight_decay"], group["beta2"]) == (100, 0.5, 2e-4, 0.99999)
    steps = config.epochs * math.ceil(100 / config.batch_size)
    for x, y in list(data.train.batches(32, generator=torch.Generator().manual_seed(0))) * config.epochs:
        assert math.isfinite(method.step(x, y))
    assert method.optimizer.current_step == steps and group["lr"] == pytest.approx(0.0, abs=1e-12)

    restored = baselines.build(config, data.train.images[:1], num_data=100)
    restored.load_state_dict(method.state_dict())
    assert restored.optimizer.current_step == steps and restored.scheduler.last_epoch == steps
    torch.testing.assert_close(restored.optimizer.param_groups[0]["hess"], group["hess"])
    draws = []
    for m in (method, restored):
        torch.manual_seed(5)
        draws.append(m.samples(data.test.images[:8], 3))
    torch.testing.assert_close(draws[0], draws[1])
    assert (draws[0][0] - draws[0][1]).abs().max() > 1e-6


@pytest.mark.parametrize("method", list(peers.PACKAGES))
def test_without_the_package_the_cli_prints_the_install_command_and_exits_2(method, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, peers.PACKAGES[method][0], None)  # the import fails, as when not installed

    def no_data(args):
        raise AssertionError("the data must not be loaded for a method that cannot run")

    monkeypatch.setattr(cli, "_load_data", no_data)
    assert cli.main(["baseline", "--method", method, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kfacvi: error: ") and "Traceback" not in err
    assert peers.INSTALL in err and peers.PACKAGES[method][1] in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(peers.PeerNotInstalled, match=r"\[peers\]"):  # the Python API says the same
        baselines.build(baselines.BaselineConfig(method=method), torch.zeros(1, 3, 32, 32), num_data=10)
