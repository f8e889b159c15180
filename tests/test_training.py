"""Presets, the training loop (metrics, curves, checkpoint/resume) and the command line."""
import contextlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pyro_kfacvi import KroneckerDelta, KroneckerNormal
from pyro_kfacvi.experiments import cli
from pyro_kfacvi.experiments.checkpoints import load_checkpoint
from pyro_kfacvi.experiments.data import CIFAR10, Split, cifar10
from pyro_kfacvi.experiments.evaluation import evaluate
from pyro_kfacvi.experiments.presets import PRESETS, TrainConfig, build, effective_warmup
from pyro_kfacvi.experiments.training import Trainer, TrainingDiverged


def cifar10_root():
    env = os.environ.get("KFACVI_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/cifar10"
    return root if (root / "cifar-10-batches-py").is_dir() or root.name == "cifar-10-batches-py" else None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_data():
    root = cifar10_root()
    if root is None:
        pytest.skip("CIFAR-10 not found (set KFACVI_DATA)")
    return cifar10(root)


def fake_data(n_train=192, n_test=96, seed=0):
    """Random images with labels a simple function of them (learnable), CIFAR-shaped."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = (x[:, 0, :16].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 16:].mean((1, 2)) > 0).long()
        return Split(x, y)

    return SimpleNamespace(train=split(n_train), test=split(n_test))


#: a tiny LeNet5 KFAC-VI configuration that runs in well under a second per epoch
TINY = PRESETS["quick"].replace(channels=(4, 8), hidden=(16, 16), epochs=2, batch_size=32, train_subset=None,
                                mc_samples=2, test_samples=3, eval_samples=0, train_eval_size=64,
                                inverse_every=3)


# --------------------------------------------------------------------------------------------
def test_validation_runs_never_see_the_test_set(tmp_path):
    """--validation N: trained on the first images, every 'test_' metric computed on the last N
    training images — equal to evaluating the final model there, and different from the test set."""
    fake = fake_data()
    data = CIFAR10(fake.train, fake.test)
    trainer = Trainer(TINY.replace(validation=64, epochs=1), data, out_dir=tmp_path, progress=False, log=None)
    trainer.run()
    assert len(trainer.train_split) == len(data.train) - 64
    assert torch.equal(trainer.data.test.labels, data.train.labels[-64:])
    held_out = evaluate(trainer.model, trainer.guide, Split(data.train.images[-64:], data.train.labels[-64:]), 0, 0, "")
    on_test = evaluate(trainer.model, trainer.guide, data.test, 0, 0, "")
    assert trainer.history[-1]["test_nll"] == pytest.approx(held_out["nll"], rel=1e-6)
    assert trainer.history[-1]["test_nll"] != pytest.approx(on_test["nll"], rel=1e-3)


def test_presets_hold_the_papers_rows():
    assert set(PRESETS) >= {"lenet5-kfac", "lenet5-kfacvi", "resnet18-kfac", "resnet18-kfacvi", "quick", "quick-kfac"}
    lenet = PRESETS["lenet5-kfac"]
    assert (lenet.initial_lr, lenet.base_lr, lenet.momentum, lenet.weight_decay, lenet.beta, lenet.damping,
            lenet.rho, lenet.power, lenet.epochs, lenet.test_samples) == (9e-7, 9e-6, 0.9, 2e-3, 0.333, 1e-7, None, 2, 15, 50)
    assert lenet.optimizer == "kfac"
    assert PRESETS["lenet5-kfacvi"].rho == 6e-5 and PRESETS["lenet5-kfacvi"].optimizer == "kfacvi"
    resnet = PRESETS["resnet18-kfac"]
    assert (resnet.initial_lr, resnet.base_lr, resnet.momentum, resnet.weight_decay, resnet.beta, resnet.damping,
            resnet.rho, resnet.power, resnet.epochs, resnet.test_samples) == (6e-7, 6e-6, 0.3, 9e-3, 0.333, 2e-7, None, 2.3, 30, 10)
    assert resnet.optimizer == "kfac"
    assert PRESETS["resnet18-kfacvi"].rho == 8e-6
    for config in PRESETS.values():
        assert config.batch_size == 64 and config.warmup_steps == 1000 and config.prior_variance == 1.0
    for name in ("lenet5-kfac", "lenet5-kfacvi", "resnet18-kfac", "resnet18-kfacvi"):
        assert PRESETS[name].lr_scale == 1.0 and PRESETS[name].weight_decay_mode == "decoupled"
    assert PRESETS["quick-kfac"].optimizer == "kfac" and PRESETS["quick-kfac"].rho is None
    # the tuned rows: Table 1's but for the damping and learning rate selected on validation and the schedule
    for name in ("lenet5-kfac", "lenet5-kfacvi"):
        tuned = PRESETS[f"{name}-tuned"]
        assert tuned == PRESETS[name].replace(damping=0.1, lr_scale=1024.0, curvature_every=16, inverse_every=100,
                                              track_eigenvalues=True)


def test_config_validation_and_rho_optimizer_consistency():
    config = PRESETS["lenet5-kfac"]
    # the optimizer decides the family; rho belongs to "kfacvi" only and no longer picks the optimizer
    assert config.replace(optimizer="kfacvi", rho=6e-5).optimizer == "kfacvi"
    assert config.replace(optimizer="noisy-kfac").rho is None
    assert PRESETS["lenet5-kfacvi"].replace(optimizer="noisy-kfac").rho is None
    assert PRESETS["lenet5-kfacvi"].replace(optimizer="kfac").rho is None
    assert PRESETS["lenet5-kfacvi"].replace(optimizer="kfac").mc_samples == 1
    with pytest.raises(ValueError, match="rho"):
        config.replace(rho=6e-5)
    with pytest.raises(ValueError, match="rho"):
        PRESETS["lenet5-kfacvi"].replace(rho=None)
    with pytest.raises(ValueError, match="rho"):
        TrainConfig(optimizer="kfac", rho=1e-3)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        config.replace(weight_decay_mode="sideways")
    with pytest.raises(ValueError, match="lenet5"):
        PRESETS["resnet18-kfac"].replace(channels=(32, 64))
    assert TrainConfig.from_dict(config.replace(channels=(32, 64)).to_dict()) == config.replace(channels=(32, 64))


def test_build_wires_the_config_into_model_guide_and_engine():
    config = PRESETS["lenet5-kfacvi"].replace(lr_scale=10.0, channels=(4, 8), damping=1e-4, mc_samples=3)
    model, guide, engine = build(config, num_data=1000, steps_per_epoch=16)
    assert model.num_data == 1000 and model.prior_variance == 1.0
    assert model.net.conv1.out_channels == 4 and model.net.conv2.out_channels == 8
    assert isinstance(guide, KroneckerNormal) and not guide.elbo_exact
    assert guide.rho == 6e-5 and guide.damping == 1e-4 and engine.num_particles == 3
    schedule = engine.lr
    assert schedule.base_lr == pytest.approx(9e-5) and schedule.initial_lr == pytest.approx(9e-6)
    assert schedule.total_steps == 15 * 16 and schedule.warmup_steps == 120 == effective_warmup(config, 240)
    assert build(PRESETS["lenet5-kfacvi"], 50_000, 782)[2].lr.warmup_steps == 1000
    _, guide, _ = build(config.replace(optimizer="noisy-kfac"), 1000, 16)
    assert isinstance(guide, KroneckerNormal) and guide.elbo_exact
    _, guide, engine = build(config.replace(optimizer="kfac"), 1000, 16)
    assert isinstance(guide, KroneckerDelta) and guide.damping == 1e-4 and engine.num_particles == 1


# --------------------------------------------------------------------------------------------
def test_run_writes_metrics_curves_and_checkpoint(tmp_path):
    trainer = Trainer(TINY, fake_data(), out_dir=tmp_path, progress=False, log=None)
    final = trainer.run()
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["config"] == TINY.to_dict()
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    for record in report["epochs"]:
        for key in ("train_acc", "test_acc", "test_nll", "test_ece", "test_brier", "loss", "lr", "time"):
            assert math.isfinite(record[key]), key
    assert report["final"]["test_samples"] == 3 and report["final"] == final
    assert final["wall_time"] > 0 and 0 <= final["test_acc"] <= 1
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 2 and state["engine"]["iteration"] == trainer.engine.iteration == 12
    assert not list(tmp_path.glob(".*tmp*"))


def _strip_times(records):
    return [{k: v for k, v in r.items() if k not in ("time", "train_time", "elapsed", "eval_time", "wall_time")}
            for r in records]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = fake_data()
    config = TINY.replace(eval_samples=2)  # sampled evaluation too: must not disturb the training RNG
    # uninterrupted: 2 epochs in one trainer
    full = Trainer(config, data, out_dir=tmp_path / "full", progress=False, log=None)
    full.train_epoch()
    full.train_epoch()
    # interrupted after epoch 1: a fresh trainer continues from the checkpoint
    first = Trainer(config, data, out_dir=tmp_path / "split", progress=False, log=None)
    first.train_epoch()
    torch.manual_seed(12345)  # anything the process does in between must not matter
    torch.randn(10)
    resumed = Trainer.resume(tmp_path / "split", data, progress=False, log=None)
    assert resumed.epoch == 1 and resumed.engine.iteration == first.engine.iteration
    resumed.train_epoch()
    assert _strip_times(resumed.history) == _strip_times(full.history)
    assert resumed.history[1]["loss"] == full.history[1]["loss"]
    for a, b in zip(resumed.guide.state_dict().values(), full.guide.state_dict().values(), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    for a, b in zip(resumed.engine.velocities, full.engine.velocities):
        assert torch.equal(a, b)
    assert _strip_times([resumed.final_evaluation()]) == _strip_times([full.final_evaluation()])


@pytest.mark.parametrize("kl_clip, on_nonfinite", [(1e-2, "raise"), (None, "retry")])
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, kl_clip, on_nonfinite):
    """The message names the remedies in command-line flags, leaving out those the run already uses."""
    config = TINY.replace(batch_size=192, kl_clip=kl_clip, on_nonfinite=on_nonfinite, max_retries=1)
    trainer = Trainer(config, fake_data(), out_dir=tmp_path, progress=False, log=None)
    trainer.guide.kl_to_prior = lambda: torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"(?s)iteration 0 .*damping.*lr-scale") as raised, \
            pytest.warns(RuntimeWarning, match="Retrying") if on_nonfinite == "retry" else contextlib.nullcontext():
        trainer.train_epoch()
    assert "diverged" in json.loads((tmp_path / "metrics.json").read_text())["error"]
    message = str(raised.value)  # the command line's words only: flags, not API arguments
    assert "--damping" in message and "--lr-scale" in message
    assert ("--kl-clip" in message) == (kl_clip is None)
    assert ("--on-nonfinite retry" in message) == (on_nonfinite != "retry")
    assert "on_nonfinite=" not in message and "split_damping" not in message and "kl_clip" not in message


def test_the_cli_does_not_abbreviate_flags(capsys):
    """``--lr 0.01`` once set ``--lr-scale`` by argparse's prefix matching."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--preset", "quick", "--lr", "0.01"])
    assert "unrecognized arguments: --lr 0.01" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
def test_cli_parses_presets_and_overrides():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--preset", "lenet5-kfac", "--base-lr", "1e-5", "--lr-scale", "100",
                              "--optimizer", "kfacvi", "--rho", "6e-5", "--damping", "1e-3", "--weight-decay-mode", "coupled",
                              "--channels", "32,64", "--train-subset", "512", "--mc-samples", "4",
                              "--test-samples", "7", "--epochs", "2", "--batch-size", "32", "--seed", "3",
                              "--split-damping", "true"])
    config = cli.config_from_args(args)
    assert config == PRESETS["lenet5-kfac"].replace(
        optimizer="kfacvi", base_lr=1e-5, lr_scale=100.0, rho=6e-5, damping=1e-3, weight_decay_mode="coupled", channels=(32, 64),
        train_subset=512, mc_samples=4, test_samples=7, epochs=2, batch_size=32, seed=3, split_damping=True)
    assert config.optimizer == "kfacvi"
    args = parser.parse_args(["train", "--preset", "lenet5-kfacvi", "--optimizer", "noisy-kfac"])
    assert cli.config_from_args(args).optimizer == "noisy-kfac" and cli.config_from_args(args).rho is None
    assert cli.config_from_args(parser.parse_args(["train", "--preset", "quick"])) == PRESETS["quick"]


def test_cli_rejects_unknown_preset_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "lenet7"])
    err = capsys.readouterr().err
    assert "lenet7" in err and "lenet5-kfacvi" in err and "quick" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "quick", "--weight-decay-mode", "sideways"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "lenet5-kfac", "--mc-samples", "4"])  # K-FAC draws identical samples
    assert "mc_samples" in capsys.readouterr().err


def test_cli_train_and_evaluate_a_checkpoint(tmp_path, monkeypatch, capsys):
    data = fake_data()
    monkeypatch.setattr(cli, "_load_data", lambda args: data)
    monkeypatch.setitem(cli.PRESETS, "tiny", TINY.replace(epochs=1))
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--test-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1" in printed and "final (S=2)" in printed
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--test-samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("test_acc", "test_nll", "test_ece", "test_brier"):
        assert result[key] == final[key], key  # same samples: the evaluation stream is seeded
    assert json.loads((out / "evaluation-S2.json").read_text())["test_acc"] == final["test_acc"]
    assert cli.main(["evaluate", "--checkpoint", str(out), "--test-samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["test_samples"] == 0
    # a resumed finished run only re-runs the final evaluation
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(out), "--preset", "quick"])


# --------------------------------------------------------------------------------------------
def test_quick_preset_learns_real_cifar10(real_data, tmp_path):
    """A few hundred LeNet5 KFAC-VI steps on real CIFAR-10 beat 30% test accuracy."""
    config = PRESETS["quick"].replace(epochs=1, test_samples=2)
    final = Trainer(config, real_data, out_dir=tmp_path, progress=False, log=None).run()
    assert final["test_acc"] > 0.30, final


def test_a_run_on_raw_pixels_is_trained_evaluated_and_analysed_on_raw_pixels(tmp_path):
    """--normalize-inputs false: the network sees the images in [0, 1] (denormalised) in training,
    in the final evaluation and in the analysis's predictor, which is handed normalised images."""
    from pyro_kfacvi.experiments.analysis import load_predictor
    from pyro_kfacvi.experiments.data import denormalize, normalize
    from pyro_kfacvi.experiments.evaluation import mean_outputs

    fake = fake_data()
    data = CIFAR10(fake.train, fake.test)
    trainer = Trainer(TINY.replace(normalize_inputs=False, epochs=1), data, out_dir=tmp_path, progress=False, log=None)
    assert torch.allclose(trainer.data.train.images, denormalize(data.train.images))
    trainer.run()
    on_raw = mean_outputs(trainer.model, trainer.guide, denormalize(data.test.images)).softmax(-1)
    predict, _ = load_predictor(tmp_path / "checkpoint.pt", data, num_samples=0)
    assert torch.allclose(predict(normalize(denormalize(data.test.images)))[0], on_raw, atol=1e-5)
    on_normalised = mean_outputs(trainer.model, trainer.guide, data.test.images).softmax(-1)
    assert not torch.allclose(on_normalised, on_raw, atol=1e-3)
