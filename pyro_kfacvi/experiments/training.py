"""Training loop for CIFAR-10: epochs of :meth:`KFACVI.step`, per-epoch evaluation, metrics,
learning curves and resumable checkpoints.

Outputs in the run folder ``DIR``:

* ``DIR/metrics.json``: ``{"config": ..., "epochs": [one record per epoch], "final": {...}}``;
* ``DIR/curves.png``: train and test accuracy against the epoch (and the NLL);
* ``DIR/checkpoint.pt``: written atomically (temporary file, fsync, rename) at every epoch end,
  every ``checkpoint_every`` steps and when SIGINT stops the run after its current step;
  :meth:`Trainer.resume` continues from it, mid-epoch included, and on CPU reproduces the
  uninterrupted run exactly (docs/robustness.md).

What is measured when (chosen to keep evaluation cheap next to training):

* progress bar: the running mean of the step losses (negative ELBO per datum, or negative log
  joint per datum for K-FAC; the epoch record splits it into ``data_loss``, the sampled-weights
  NLL per datum, and ``complexity``, kl_weight·KL/N or −log p(μ)/N) and ``acc``, a running train accuracy: every ``probe_every`` (50)
  steps, the accuracy of the posterior *mean* on the current minibatch (one no-grad forward of
  B images; it does not touch any RNG), averaged over the probes of the epoch so far;
* per epoch: ``train_acc`` is the accuracy of the posterior predictive with ``eval_samples``
  samples (0: the posterior mean) on a fixed subset of the first ``train_eval_size`` (5,000)
  training images, and ``test_acc/test_nll/test_ece`` (15 bins)``/test_brier`` the same
  predictive on the whole test set;
* ``final``: the Monte Carlo posterior predictive of eq. (1) with ``test_samples`` samples on the
  test set (and the train subset).

Evaluation draws its weight samples from a separate RNG stream seeded from ``config.seed`` and the
epoch (:func:`~pyro_kfacvi.experiments.evaluation.private_rng`), so evaluating does not change the training trajectory and
``kfacvi evaluate`` with the same S reproduces the ``final`` record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..distributed import ParallelPlan
from .checkpoints import CHECKPOINT, CURVES, METRICS, CheckpointError, atomic_write, load_checkpoint
from .evaluation import eval_seed, evaluate, mean_outputs, seed_everything
from .presets import TrainConfig, build, effective_warmup

__all__ = ["CHECKPOINT_FORMAT", "EpochProgress", "TrainingDiverged", "TrainingInterrupted", "Trainer"]

#: 3: the guide's state carries its family and configuration, γ moved from the engine's state to it
#: (2: μ and the momentum in the eigenbasis of the curvature; 1: in the weights')
CHECKPOINT_FORMAT = 3


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss, gradient or curvature."""


class TrainingInterrupted(Exception):
    """SIGINT stopped the run after a step; its checkpoint holds everything needed to resume."""


@dataclasses.dataclass
class EpochProgress:
    """How far the current epoch has got: what a mid-epoch checkpoint needs to finish it exactly."""

    data_order: torch.Tensor  # state of the data-order generator before the epoch's permutation
    steps: int = 0
    loss_sum: float = 0.0
    complexity_sum: float | torch.Tensor = 0.0
    probe_correct: int = 0
    probe_count: int = 0
    train_time: float = 0.0  # seconds of training in earlier sessions

    @property
    def probe_accuracy(self) -> float:
        return self.probe_correct / max(self.probe_count, 1)


class Trainer:
    """Trains ``(model, guide, engine)`` built from a :class:`TrainConfig` on ``data`` (a
    :class:`~pyro_kfacvi.data.CIFAR10`, on the device to train on).

    :param TrainConfig config: the run's hyperparameters.
    :param data: object with ``train`` and ``test`` splits.
    :param out_dir: run folder for metrics, curves and checkpoints (``None``: write nothing).
    :param bool progress: show a tqdm progress bar.
    :param log: callable receiving the per-epoch and summary lines (``None``: silent).
    :param int probe_every: steps between running train-accuracy probes of the progress bar.
    :param int checkpoint_every: also write the checkpoint every this many steps (0: at epoch ends
        only). Inside :meth:`run`, SIGINT (Ctrl-C) finishes the current step, writes the checkpoint
        and raises :class:`TrainingInterrupted`; a second SIGINT interrupts at once.

    With ``config.parallel`` set, every process of the ``torch.distributed`` group runs its own
    Trainer (docs/distributed.md): each trains on its shard of the global minibatches with its own
    weight samples, all hold the same guide, and only rank 0 logs and writes ``out_dir``.

    Use :meth:`run` (or :meth:`train_epoch` / :meth:`final_evaluation` step by step);
    :meth:`resume` continues a run from its checkpoint.
    """

    def __init__(self, config: TrainConfig, data, out_dir=None, progress=True, log=print, probe_every=50,
                 checkpoint_every=0):
        self.config = config
        data = data if config.normalize_inputs else data.raw_pixels()
        self.data = data if config.validation is None else data.holdout(config.validation)
        data = self.data
        self.parallel = None if config.parallel is None else ParallelPlan(config.parallel, config.seed,
                                                                          config.sample_groups)
        if self.parallel is not None and self.parallel.rank != 0:
            out_dir, progress, log = None, False, None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.log, self.probe_every = progress, log, int(probe_every)
        train = data.train if config.train_subset is None else data.train.subset(config.train_subset)
        # the global minibatch: data shards x batch_size
        self.batch_size = config.batch_size if self.parallel is None else self.parallel.global_batch_size(
            config.batch_size, len(train))
        if self.batch_size > len(train):
            raise ValueError(f"the minibatch of {self.batch_size} images is larger than the training set "
                             f"({len(train)} images)")
        self.train_split = train
        self.train_eval_split = train.subset(min(config.train_eval_size, len(train)))
        self.steps_per_epoch = math.ceil(len(train) / self.batch_size)
        seed_everything(config.seed)
        self.model, self.guide, self.engine = build(config, len(train), self.steps_per_epoch, device=train.device,
                                                    parallel=self.parallel)
        if self.parallel is not None:
            self.parallel.synchronize_(self.model.net, self.guide)
            self.parallel.seed_global_rng()
        # data order: a CPU generator of its own, so the order is the same on every device
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []
        self.final: dict | None = None
        self.elapsed = 0.0  # training + evaluation seconds over all sessions of this run
        if int(checkpoint_every) != checkpoint_every or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every}")
        self.checkpoint_every = int(checkpoint_every)
        self.partial_epoch: EpochProgress | None = None  # set by a mid-epoch checkpoint
        self.stop_requested = False  # set by SIGINT inside run()

    # ------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def _say(self, line: str) -> None:
        if self.log is not None:
            if self.progress:
                tqdm.write(line, file=sys.stdout)
            else:
                self.log(line)

    def batches(self):
        """One epoch of this process's minibatches (under data parallelism: its shards)."""
        batches = self.train_split.batches(self.batch_size, shuffle=True, generator=self.generator)
        return batches if self.parallel is None else (self.parallel.shard(x, y) for x, y in batches)

    def train_epoch(self) -> dict:
        """One pass over the training split (its remaining steps after a mid-epoch checkpoint);
        returns (and records) the epoch's metrics."""
        start = time.perf_counter()
        progress = self.partial_epoch or EpochProgress(self.generator.get_state())
        self.generator.set_state(progress.data_order)  # a resumed epoch redraws the same permutation
        bar = tqdm(total=self.steps_per_epoch, initial=progress.steps, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            for x, y in itertools.islice(self.batches(), progress.steps, None):
                self._train_step(x, y, progress, bar)
                self._checkpoint_after_step(progress, start)
        finally:
            bar.close()
        train_time = progress.train_time + time.perf_counter() - start
        self.partial_epoch = None
        if self.parallel is not None:  # BatchNorm's running statistics of all ranks' samples and shards
            self.parallel.average_buffers_(self.model.net)
        record = self._epoch_record(progress, train_time)
        record["time"] = time.perf_counter() - start
        self.elapsed += record["time"]
        record["elapsed"] = self.elapsed
        self.epoch += 1
        self.history.append(record)
        self._say(self.epoch_line(record))
        if self.out_dir is not None:
            self.save()
        return record

    def _train_step(self, x, y, progress: EpochProgress, bar) -> None:
        """One engine step on ``(x, y)`` with its bookkeeping: the loss sums, the train-accuracy
        probe every ``probe_every`` steps, the progress bar; a diverged step raises."""
        engine = self.engine
        t = engine.iteration
        lr = engine.hyperparameters(t)[0]
        try:
            loss = engine.step(x, y)
        except FloatingPointError as exc:
            self._diverged(t, lr, getattr(exc, "fact", str(exc)))
        # the KL (or −log prior) part of the loss, summed without a host synchronisation
        progress.complexity_sum = progress.complexity_sum + engine.last_complexity
        if not math.isfinite(loss):
            self._diverged(t, lr, f"step returned loss {loss}")
        progress.loss_sum += loss
        progress.steps += 1
        steps = progress.steps
        if steps % self.probe_every == 1 or self.probe_every == 1:
            pred = mean_outputs(self.model, self.guide, x).argmax(-1)
            progress.probe_correct += int((pred == y).sum())
            progress.probe_count += y.shape[0]
        bar.update(1)
        if steps % 10 == 0 or steps == self.steps_per_epoch:
            bar.set_postfix(loss=f"{progress.loss_sum / steps:.4f}", acc=f"{progress.probe_accuracy:.3f}",
                            lr=f"{lr:.3g}", refresh=False)

    def _epoch_record(self, progress: EpochProgress, train_time: float) -> dict:
        """The epoch's training summary and its evaluation on the train-evaluation and test splits."""
        cfg, engine = self.config, self.engine
        lr, momentum = engine.hyperparameters(engine.iteration - 1)
        record = {
            "epoch": self.epoch + 1,
            "iteration": engine.iteration,
            "loss": progress.loss_sum / progress.steps,
            "data_loss": (progress.loss_sum - float(progress.complexity_sum)) / progress.steps,
            "complexity": float(progress.complexity_sum) / progress.steps,
            "lr": lr,
            "momentum": momentum,
            "probe_train_acc": progress.probe_accuracy,
        }
        seed = eval_seed(cfg.seed, self.epoch)
        record.update(evaluate(self.model, self.guide, self.train_eval_split, cfg.eval_samples, seed, "train_"))
        record.update(evaluate(self.model, self.guide, self.data.test, cfg.eval_samples, seed, "test_"))
        record["train_time"] = train_time
        return record

    def _checkpoint_after_step(self, progress: EpochProgress, start: float) -> None:
        """Inside an epoch: write the checkpoint every ``checkpoint_every`` steps (the epoch end
        writes its own), and when SIGINT asked to stop, write it and raise :class:`TrainingInterrupted`."""
        if self.out_dir is None:
            return
        due = self.checkpoint_every and self.engine.iteration % self.checkpoint_every == 0
        if self.stop_requested or (due and progress.steps < self.steps_per_epoch):
            self.partial_epoch = dataclasses.replace(progress, train_time=progress.train_time + time.perf_counter() - start)
            self.save_checkpoint()
        if self.stop_requested:
            raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"interrupted after iteration {self.engine.iteration} (epoch {self.epoch + 1}); the run is saved in "
            f"{self.out_dir}: continue it with kfacvi train --resume {self.out_dir}")

    @contextlib.contextmanager
    def _sigint_requests_stop(self):
        """While inside, SIGINT sets :attr:`stop_requested` (and restores the previous handler, so a
        second SIGINT interrupts at once). Only with a run folder and in the main thread."""
        if self.out_dir is None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _diverged(self, t, lr, detail):
        bad = [f"{block.name}.{name}" for block in self.guide.blocks
               for name, value in block.named_buffers() if not bool(torch.isfinite(value).all())]
        where = (f"\nNon-finite guide state before this step: {', '.join(bad)} (a curvature eigendecomposition "
                 "that returned NaN poisons every later sample).") if bad else ""
        remedies = [f"a larger damping (--damping, now {self.guide.damping:g})",
                    f"a smaller learning rate (--lr-scale, now {self.config.lr_scale:g})"]
        if self.config.kl_clip is None:
            remedies.insert(1, "a trust region (--kl-clip 1e-2)")
        if self.config.on_nonfinite != "retry":
            remedies.insert(1, "--on-nonfinite retry")
        message = (
            f"training diverged at iteration {t} (epoch {self.epoch + 1}, lr {lr:.3g}): {detail}{where}\n"
            f"Try {', '.join(remedies[:-1])} or {remedies[-1]}. The checkpoint (if any) holds the state "
            "before the failing step."
        )
        if self.out_dir is not None:
            self.write_metrics(error=message)
        raise TrainingDiverged(message)

    def final_evaluation(self) -> dict:
        """The Monte Carlo predictive with ``test_samples`` samples on the test set (and on the
        train subset); recorded as ``final``."""
        cfg = self.config
        start = time.perf_counter()
        seed = eval_seed(cfg.seed, None)
        final = {"test_samples": cfg.test_samples, "epochs": self.epoch, "iteration": self.engine.iteration}
        final.update(evaluate(self.model, self.guide, self.data.test, cfg.test_samples, seed, "test_"))
        final.update(evaluate(self.model, self.guide, self.train_eval_split, cfg.test_samples, seed, "train_"))
        final["eval_time"] = time.perf_counter() - start
        self.elapsed += final["eval_time"]
        final["wall_time"] = self.elapsed
        self.final = final
        self._say(self.summary_line(final))
        if self.out_dir is not None:
            self.save()
        return final

    def run(self) -> dict:
        """Train the remaining epochs, then the final evaluation; returns the ``final`` record."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            total = self.total_steps
            self._say(f"training {self.config.model} with {self.config.optimizer} on {len(self.train_split)} images: "
                      f"{self.config.epochs} epochs x {self.steps_per_epoch} steps, warm-up "
                      f"{effective_warmup(self.config, total)} steps; writing {self.out_dir}")
        with self._sigint_requests_stop():
            while self.epoch < self.config.epochs:
                self.train_epoch()
                if self.stop_requested:  # SIGINT during the epoch-end evaluation: its checkpoint is written
                    raise self._interrupted()
        return self.final_evaluation()

    # ------------------------------------------------------------------------------------
    @staticmethod
    def epoch_line(r: dict) -> str:
        return (f"epoch {r['epoch']:3d}  loss {r['loss']:.4f}  lr {r['lr']:.3g}  train_acc {r['train_acc']:.4f}  "
                f"test_acc {r['test_acc']:.4f}  nll {r['test_nll']:.4f}  ece {r['test_ece']:.4f}  "
                f"brier {r['test_brier']:.4f}  ({r['time']:.1f}s)")

    @staticmethod
    def summary_line(f: dict) -> str:
        return (f"final (S={f['test_samples']}): test_acc {f['test_acc']:.4f}  test_nll {f['test_nll']:.4f}  "
                f"test_ece {f['test_ece']:.4f}  test_brier {f['test_brier']:.4f}  train_acc {f['train_acc']:.4f}  "
                f"wall {f['wall_time']:.1f}s")

    def metrics_dict(self, **extra) -> dict:
        out = {"config": self.config.to_dict(), "num_train": len(self.train_split),
               "steps_per_epoch": self.steps_per_epoch, "epochs": self.history}
        if self.final is not None:
            out["final"] = self.final
        out.update(extra)
        return out

    def write_metrics(self, **extra) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.metrics_dict(**extra), indent=2, allow_nan=True) + "\n"
        atomic_write(self.out_dir / METRICS, lambda f: f.write(text.encode()))

    def plot(self) -> None:
        """``curves.png``: train and test accuracy per epoch (left, as the paper's Figure 1) and the
        NLL per datum (right: the data term of the training loss and the test NLL)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        epochs = [r["epoch"] for r in self.history]
        fig = Figure(figsize=(9, 3.6))
        FigureCanvasAgg(fig)
        ax, ax_loss = fig.subplots(1, 2)
        ax.plot(epochs, [r["train_acc"] for r in self.history], "o-", label="train")
        ax.plot(epochs, [r["test_acc"] for r in self.history], "s-", label="test")
        if self.final is not None:
            ax.plot([self.final["epochs"]], [self.final["test_acc"]], "k*", markersize=10,
                    label=f"test, S={self.final['test_samples']}")
        ax.set(xlabel="epoch", ylabel="accuracy",
               title=f"{self.config.model} {self.config.optimizer}")
        ax.grid(alpha=0.3)
        ax.legend()
        ax_loss.plot(epochs, [r.get("data_loss", math.nan) for r in self.history], "o-", label="train (data term of the step loss)")
        ax_loss.plot(epochs, [r["test_nll"] for r in self.history], "s-", label="test NLL")
        ax_loss.set(xlabel="epoch", ylabel="negative log-likelihood per datum", title="NLL")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.out_dir / CURVES, lambda f: fig.savefig(f, format="png", dpi=110))

    # ------------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "data_order": self.generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
            "guide": self.guide.state_dict(), "engine": self.engine.state_dict(), "history": self.history,
            "final": self.final, "elapsed": self.elapsed, "rng": rng, "num_train": len(self.train_split),
            "partial_epoch": None if self.partial_epoch is None else dataclasses.asdict(self.partial_epoch),
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = self.state()
        atomic_write(self.out_dir / CHECKPOINT, lambda f: torch.save(state, f))

    def save(self) -> None:
        """Write checkpoint, metrics and curves."""
        self.save_checkpoint()
        self.write_metrics()
        self.plot()

    def check_compatible(self, state: dict) -> None:
        """Raise :class:`CheckpointError` unless ``state`` comes from a run of this configuration on
        a training set of this size, written in this version's format."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"the checkpoint has format {state.get('format')}, this version reads format "
                                  f"{CHECKPOINT_FORMAT} (the guide's family and configuration in its state): resume it "
                                  "with the version that wrote it, or start the run again")
        saved, current = state["config"], self.config.to_dict()
        differing = [f"{k}={saved[k]!r} (here {current.get(k)!r})" for k in sorted(saved) if saved[k] != current.get(k)]
        if differing:
            raise CheckpointError(f"the checkpoint belongs to a different run: {', '.join(differing)}. Load it with "
                                  "Trainer.resume or Trainer.from_checkpoint, which rebuild its model")
        num_train = state.get("num_train", len(self.train_split))
        if num_train != len(self.train_split):
            raise CheckpointError(f"the checkpoint was trained on {num_train} images, this training set has "
                                  f"{len(self.train_split)}: pass the run's data (--data-dir)")

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (see :meth:`state`); checked by :meth:`check_compatible` first."""
        self.check_compatible(state)
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.engine.load_state_dict(state["engine"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.final, self.elapsed = state.get("final"), float(state.get("elapsed", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["data_order"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        partial = state.get("partial_epoch")
        self.partial_epoch = None if partial is None else EpochProgress(**partial)

    @classmethod
    def resume(cls, run_dir, data, progress=True, log=print, probe_every=50, checkpoint_every=0):
        """Continue the run saved in ``run_dir/checkpoint.pt`` (its configuration, its folder)."""
        state = load_checkpoint(run_dir)
        trainer = cls(_checkpoint_config(state, run_dir), data,
                      out_dir=Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent,
                      progress=progress, log=log, probe_every=probe_every, checkpoint_every=checkpoint_every)
        trainer.load_state(state)
        if trainer.log is not None:
            steps = trainer.partial_epoch.steps if trainer.partial_epoch is not None else 0
            trainer._say(f"resumed {run_dir} after epoch {trainer.epoch} and {steps} steps of the next "
                         f"(iteration {trainer.engine.iteration})")
        return trainer

    @classmethod
    def from_checkpoint(cls, path, data, **kwargs):
        """A trainer holding the checkpoint's model and guide, writing nothing (for evaluation)."""
        state = load_checkpoint(path)
        trainer = cls(_checkpoint_config(state, path), data, out_dir=None, progress=False, log=None, **kwargs)
        trainer.load_state(state)
        return trainer


def _checkpoint_config(state, path) -> TrainConfig:
    """The :class:`TrainConfig` of a training checkpoint."""
    try:
        return TrainConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint of kfacvi train ({type(exc).__name__}: {exc})") from exc
