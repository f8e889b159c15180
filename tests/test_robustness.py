"""Robustness (docs/robustness.md): bad input fails early and clearly, numerical faults leave the
state untouched, and interrupted runs (crash, SIGINT, SIGKILL) resume bit for bit on CPU."""
import copy
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal, Retry, curvature
from pyro_kfacvi.curvature.estimator import all_finite
from pyro_kfacvi.experiments import cli
from pyro_kfacvi.experiments.checkpoints import CheckpointError, load_checkpoint
from pyro_kfacvi.experiments.data import cifar10
from pyro_kfacvi.experiments.presets import TrainConfig
from pyro_kfacvi.experiments.training import CHECKPOINT_FORMAT, Trainer, TrainingInterrupted
from test_training import TINY, _strip_times, cifar10_root, fake_data

pytestmark = pytest.mark.usefixtures("one_thread")


def small_engine(damping=1e-3, **kwargs):
    """A convolution, a BatchNorm (whose running statistics the forward pass moves) and a linear
    layer on 8x8 images with 5 classes, after one step so that F̂ and the momentum are not trivial."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model = BayesianModel(net, Categorical(), 1.0, 100)
    guide = KroneckerNormal(model, rho=0.1, damping=damping)
    engine = KFACVI(model, guide, lr=0.1, momentum=0.9, num_particles=2, **kwargs)
    engine.step(*batch())
    return engine


def batch(n=8):
    return torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,))


def state_of(engine):
    """Everything a step may change: guide buffers and damping (its extra state), network buffers,
    momentum, iteration."""
    return copy.deepcopy({"guide": engine.guide.state_dict(), "model": engine.model.state_dict(),
                          "engine": engine.state_dict()})


def assert_same_state(a, b):
    assert a["engine"]["iteration"] == b["engine"]["iteration"]
    assert a["guide"]["_extra_state"]["damping"] == b["guide"]["_extra_state"]["damping"]
    for name in ("guide", "model"):
        assert a[name].keys() == b[name].keys()
        for key, value in a[name].items():
            same = torch.equal(value, b[name][key]) if torch.is_tensor(value) else value == b[name][key]
            assert same, f"{name}.{key}"
    for va, vb in zip(a["engine"]["velocities"], b["engine"]["velocities"], strict=True):
        assert torch.equal(va, vb)


# --------------------------------------------------------------------------------------------
# bad input
def _bad(x, y, edit):
    x, y = x.clone(), y.clone()
    edit(x, y)
    return x, y


@pytest.mark.parametrize("make_batch,match", [
    (lambda x, y: (x[:, :1], y), r"cannot take inputs of shape \(1, 8, 8\).*channels"),
    (lambda x, y: (x[..., :6, :6], y), r"cannot take inputs of shape \(3, 6, 6\)"),
    (lambda x, y: _bad(x, y, lambda x, y: y.__setitem__(2, 5)), r"1 targets outside the class indices 0..4 .*index 2: 5"),
    (lambda x, y: _bad(x, y, lambda x, y: y.__setitem__(0, -1)), r"outside the class indices 0..4 .*index 0: -1"),
    (lambda x, y: _bad(x, y, lambda x, y: x[3].view(-1).__setitem__(7, float("nan"))), r"NaN or Inf in 1 of its 8 examples .*index 3"),
    (lambda x, y: _bad(x, y, lambda x, y: x[5:].fill_(float("inf"))), r"NaN or Inf in 3 of its 8 examples .*index 5"),
])
def test_bad_input_raises_a_clear_error_before_any_state_changes(make_batch, match):
    engine = small_engine()
    x, y = make_batch(*batch())
    before, rng = state_of(engine), torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        engine.step(x, y)
    assert_same_state(state_of(engine), before)
    assert torch.equal(torch.get_rng_state(), rng)  # rejected before drawing any weight sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_inputs_whose_sum_overflows_pass_the_value_check(dtype):
    """The check sums x (NaN and Inf propagate) and looks at every entry only when the sum is not
    finite: huge but finite inputs must pass, one NaN among them must not."""
    model = small_engine().model.to(dtype)
    x, y = batch()
    x = x.to(dtype)
    x[:, 0] = torch.finfo(dtype).max
    model.check_values(x, y)
    x[6, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of its 8 examples .*index 6"):
        model.check_values(x, y)


@pytest.mark.parametrize("make,match", [
    (lambda m, g: KFACVI(m, g, lr=0.0), "lr must be a positive number"),
    (lambda m, g: KFACVI(m, g, lr=-1e-3), "lr must be a positive number"),
    (lambda m, g: KFACVI(m, g, lr=float("nan")), "lr must be a positive number"),
    (lambda m, g: KFACVI(m, KroneckerNormal(m, rho=0.1, damping=0.0), lr=0.1), "damping=0 leaves F̂ \\+ γI singular"),
    (lambda m, g: KroneckerNormal(m, rho=0.1, damping=-1.0), "damping must be a finite number >= 0"),
    (lambda m, g: setattr(g, "damping", float("inf")), "damping must be a finite number >= 0"),
    (lambda m, g: KFACVI(m, g, lr=0.1, on_nonfinite="ignore"), "on_nonfinite must be one of"),
    (lambda m, g: KFACVI(m, g, lr=0.1, on_nonfinite=Retry(max_retries=-1)), "max_retries must be an integer >= 0"),
    (lambda m, g: KFACVI(m, g, lr=0.1, on_nonfinite=Retry(damping_growth=1.0)),
     "damping_growth must be a finite number > 1"),
    (lambda m, g: KFACVI(m, g, lr=0.1, curvature=CurvatureConfig(kfac_approx="diagonal")),
     "kfac_approx must be one of"),
    (lambda m, g: TrainConfig(kfac_approx="Reduce"), "kfac_approx must be one of"),
    (lambda m, g: TrainConfig(damping=0.0), "'kfacvi' needs damping > 0"),
    (lambda m, g: TrainConfig(on_nonfinite="ignore"), "on_nonfinite must be one of"),
    (lambda m, g: TrainConfig(damping_growth=0.5), "damping_growth must be a finite number > 1"),
])
def test_invalid_hyperparameters_are_rejected(make, match):
    model = BayesianModel(nn.Linear(2, 3), Categorical(), 1.0, 10)
    with pytest.raises(ValueError, match=match):
        make(model, KroneckerNormal(model, rho=0.1))


# --------------------------------------------------------------------------------------------
# numerical faults
def poison_statistics(engine, monkeypatch, where, value, attempts):
    """Make the first ``attempts`` calls of ``engine.statistics`` return a non-finite loss,
    gradient or curvature factor (after the real forward pass, which moves BatchNorm's statistics)."""
    real, calls = engine.statistics, []

    def statistics(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(where)
        if len(calls) <= attempts:
            target = {"loss": stats.nll, "gradient": stats.grads[-1], "factor": stats.factors[0][1]}[where]
            target.view(-1)[0] = value
        return stats

    monkeypatch.setattr(engine, "statistics", statistics)
    return calls


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_found(value):
    def check(tensors):
        return all_finite(tensors, torch.stack(torch._foreach_norm(tensors)).tolist())

    tensors = [torch.randn(()), torch.randn(401, 401), torch.randn(7, dtype=torch.float64)]
    tensors[1][0, 0] = -3e38  # finite, however large
    assert check(tensors)  # through the entries: this tensor's norm overflows
    for index, tensor in enumerate(tensors):
        for position in {0, min(tensor.numel() // 2 + 3, tensor.numel() - 1), tensor.numel() - 1}:
            poisoned = [t.clone() for t in tensors]
            poisoned[index].view(-1)[position] = value
            assert not check(poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["loss", "gradient", "factor"])
def test_non_finite_statistics_are_rejected_without_changing_the_state(monkeypatch, where, value):
    engine = small_engine()
    before = state_of(engine)
    poison_statistics(engine, monkeypatch, where, value, attempts=1)
    with pytest.raises(FloatingPointError, match="non-finite loss, gradient or curvature at iteration 1"):
        engine.step(*batch())
    assert_same_state(state_of(engine), before)


def test_retry_policy_grows_the_damping_and_takes_the_step(monkeypatch):
    engine = small_engine(damping=1e-3, on_nonfinite=Retry(damping_growth=10.0))
    before = state_of(engine)
    calls = poison_statistics(engine, monkeypatch, "gradient", float("nan"), attempts=2)
    with pytest.warns(RuntimeWarning, match="Retrying") as warned:
        loss = engine.step(*batch())
    assert [str(w.message).split("Retrying ")[1] for w in warned] == ["(1 of 3) with damping 0.01.",
                                                                      "(2 of 3) with damping 0.1."]
    assert len(calls) == 3 and engine.guide.damping == pytest.approx(0.1) and engine.iteration == 2
    # checkpoints keep the grown damping, in the guide's state
    assert engine.guide.state_dict()["_extra_state"]["damping"] == engine.guide.damping
    assert "damping" not in engine.state_dict()
    moved = [not torch.equal(block.eigenbasis_loc, before["guide"][f"blocks.{i}.eigenbasis_loc"]) for i, block in enumerate(engine.guide.blocks)]
    assert all(moved) and all(torch.isfinite(block.loc).all() for block in engine.guide.blocks)
    assert torch.isfinite(torch.tensor(loss))


def test_exhausted_retries_restore_the_damping_and_raise(monkeypatch):
    engine = small_engine(damping=1e-3, on_nonfinite=Retry(max_retries=2))
    before = state_of(engine)
    calls = poison_statistics(engine, monkeypatch, "factor", float("inf"), attempts=3)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"2 retries .* up to 0.1 failed too"):
        engine.step(*batch())
    assert len(calls) == 3
    assert_same_state(state_of(engine), before)


def test_ill_conditioned_factors_give_a_valid_eigenbasis_and_a_finite_step(monkeypatch):
    """Rank-one factors with an asymmetric round-off: their symmetric part has negative eigenvalues."""
    engine = small_engine(damping=1e-3, curvature=CurvatureConfig(beta=1.0, inverse_every=1))
    real = engine.statistics

    def ill_conditioned(*args, **kwargs):
        stats = real(*args, **kwargs)
        factors = []
        for fs in stats.factors:
            rank_one = [torch.outer(f[0], f[0]) * 1e4 if f.dim() == 2 else f for f in fs]
            factors.append(tuple(f + 1e-3 * torch.randn_like(f).triu(1) if f.dim() == 2 else f for f in rank_one))
        stats.factors = factors
        return stats

    monkeypatch.setattr(engine, "statistics", ill_conditioned)
    engine.step(*batch())
    kronecker = [block.curvature for block in engine.guide.blocks if isinstance(block.curvature, curvature.KroneckerFactors)]
    assert min(torch.linalg.eigvalsh(factors.A).min() for factors in kronecker) < 0
    for factors in kronecker:
        for side in ("A", "G"):
            values, vectors = getattr(factors, f"eigenvalues_{side}"), getattr(factors, f"eigenvectors_{side}")
            assert (values >= 0).all() and torch.isfinite(vectors).all()
            torch.testing.assert_close(vectors.T @ vectors, torch.eye(len(values)), atol=1e-4, rtol=0)
    assert all(torch.isfinite(block.loc).all() for block in engine.guide.blocks)


def test_eigh_that_raises_in_float32_is_redone_in_float64(monkeypatch):
    real_eigh = torch.linalg.eigh

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    m = torch.randn(6, 6)
    m = m @ m.T
    values, vectors = curvature.symmetric_eigh(m)
    assert values.dtype == torch.float32 and (values >= 0).all()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# interrupted runs and determinism
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """TINY (2 epochs of 6 steps) trained without interruption, with its final evaluation."""
    torch.set_num_threads(1)
    trainer = Trainer(TINY, fake_data(), out_dir=tmp_path_factory.mktemp("full"), progress=False, log=None)
    trainer.run()
    return trainer


def assert_same_run(trainer, reference):
    assert _strip_times(trainer.history) == _strip_times(reference.history)
    assert _strip_times([trainer.final]) == _strip_times([reference.final])
    assert_same_state(state_of(trainer.engine), state_of(reference.engine))


def test_same_seed_gives_the_same_run_on_cpu(uninterrupted):
    again = Trainer(TINY, fake_data(), progress=False, log=None)
    again.run()
    assert_same_run(again, uninterrupted)
    other_seed = Trainer(TINY.replace(seed=1), fake_data(), progress=False, log=None)
    other_seed.train_epoch()
    assert other_seed.history[0]["loss"] != uninterrupted.history[0]["loss"]


def test_crash_after_a_step_checkpoint_resumes_bit_for_bit(tmp_path, uninterrupted):
    trainer = Trainer(TINY, fake_data(), out_dir=tmp_path, progress=False, log=None, checkpoint_every=4)
    real_step = trainer.engine.step

    def crash_at_iteration_9(x, y):
        if trainer.engine.iteration == 9:
            raise MemoryError("simulated crash")
        return real_step(x, y)

    trainer.engine.step = crash_at_iteration_9
    with pytest.raises(MemoryError):
        trainer.run()
    state = load_checkpoint(tmp_path)  # written at iteration 8: epoch 2, 2 of its 6 steps done
    assert state["engine"]["iteration"] == 8 and state["epoch"] == 1 and state["partial_epoch"]["steps"] == 2
    torch.randn(100)  # whatever happens in between must not matter
    resumed = Trainer.resume(tmp_path, fake_data(), progress=False, log=None)
    resumed.run()
    assert_same_run(resumed, uninterrupted)


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test, whatever the launcher left (``nohup`` and
    background jobs start with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_finishes_the_step_writes_a_checkpoint_and_resumes_bit_for_bit(tmp_path, uninterrupted,
                                                                              default_sigint):
    trainer = Trainer(TINY, fake_data(), out_dir=tmp_path, progress=False, log=None)
    real_step = trainer.engine.step

    def interrupted_during_iteration_3(x, y):
        if trainer.engine.iteration == 3:
            signal.raise_signal(signal.SIGINT)
        return real_step(x, y)

    trainer.engine.step = interrupted_during_iteration_3
    with pytest.raises(TrainingInterrupted, match=f"after iteration 4 .*--resume {tmp_path}"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    state = load_checkpoint(tmp_path)
    assert state["engine"]["iteration"] == 4 and state["partial_epoch"]["steps"] == 4
    resumed = Trainer.resume(tmp_path, fake_data(), progress=False, log=None)
    resumed.run()
    assert_same_run(resumed, uninterrupted)


@pytest.fixture(scope="module")
def real_data():
    root = cifar10_root()
    if root is None:
        pytest.skip("CIFAR-10 not found (set KFACVI_DATA)")
    return root, cifar10(root)


#: ``kfacvi train`` arguments of a small LeNet5 run: one epoch of 30 steps on 960 real CIFAR-10 images
KILLED_RUN = ["--preset", "quick", "--channels", "4,8", "--hidden", "16,16", "--train-subset", "960",
              "--batch-size", "32", "--epochs", "1", "--lr-scale", "100", "--test-samples", "2",
              "--train-eval-size", "64"]


def wait_until(condition, process):
    while not condition():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, real_data):
    root, data = real_data
    out = tmp_path / "killed"
    common = ["--no-progress", "--threads", "1", "--data-dir", str(root), "--checkpoint-every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "pyro_kfacvi", "train", *KILLED_RUN, "--out", str(out), *common],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (out / "checkpoint.pt").exists(), run)  # the first step checkpoint
        run.kill()
    finally:
        _, err = run.communicate()
    assert run.returncode == -signal.SIGKILL, err.decode()
    state = load_checkpoint(out)
    assert state["epoch"] == 0 and state["partial_epoch"]["steps"] == state["engine"]["iteration"] < 30
    resumed = subprocess.run([sys.executable, "-m", "pyro_kfacvi", "train", "--resume", str(out), *common],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    config = cli.config_from_args(cli.build_parser().parse_args(["train", *KILLED_RUN]))
    reference = Trainer(config, data, progress=False, log=None)
    reference.run()
    report = json.loads((out / "metrics.json").read_text())
    assert _strip_times(report["epochs"]) == _strip_times(json.loads(json.dumps(reference.history)))
    assert _strip_times([report["final"]]) == _strip_times([reference.final])


# --------------------------------------------------------------------------------------------
# checkpoints and the command line
def test_checkpoint_of_a_different_run_or_a_damaged_file_is_rejected(tmp_path, monkeypatch, capsys):
    source = Trainer(TINY, fake_data(), out_dir=tmp_path, progress=False, log=None)
    source.train_epoch()
    state = load_checkpoint(tmp_path)
    other = Trainer(TINY.replace(channels=(2, 8)), fake_data(), progress=False, log=None)
    before = state_of(other.engine)
    with pytest.raises(CheckpointError, match=r"different run: channels=\[4, 8\] \(here \[2, 8\]\)"):
        other.load_state(state)
    assert_same_state(state_of(other.engine), before)
    with pytest.raises(CheckpointError, match="trained on 192 images, this training set has 160"):
        Trainer(TINY, fake_data(n_train=160), progress=False, log=None).load_state(state)
    # format 1: μ in weight coordinates; format 2: γ in the engine's state, the guide's family not saved
    for old in range(1, CHECKPOINT_FORMAT):
        with pytest.raises(CheckpointError, match=f"has format {old}, this version reads format {CHECKPOINT_FORMAT}"):
            Trainer(TINY, fake_data(), progress=False, log=None).load_state({**state, "format": old})

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:5000])  # cut off, as by a full disk
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    monkeypatch.setattr(cli, "_load_data", lambda args: fake_data())
    assert cli.main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of kfacvi train"):
        Trainer.resume(tmp_path, fake_data(), progress=False, log=None)


@pytest.mark.parametrize("argv,match", [
    (["train", "--preset", "quick", "--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate"),
    (["train", "--preset", "quick", "--on-nonfinite", "ignore"], "invalid choice: 'ignore'"),
    (["train", "--preset", "quick", "--checkpoint-every", "-5"], "--checkpoint-every must be >= 0"),
    (["train", "--preset", "quick", "--damping", "0"], "needs damping > 0"),
    (["train", "--preset", "lenet9"], "invalid choice: 'lenet9'"),
])
def test_cli_rejects_unknown_options_and_bad_values(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
def _resident_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_over_many_epochs():
    trainer = Trainer(TINY.replace(epochs=25, lr_scale=50.0), fake_data(), progress=False, log=None)
    for _ in range(5):  # allocator and caches warm up
        trainer.train_epoch()
    tensors, resident = _live_tensors(), _resident_bytes()
    for _ in range(20):  # 120 more steps
        trainer.train_epoch()
    assert _live_tensors() == tensors
    assert _resident_bytes() - resident < 8 * 2 ** 20
