"""Baselines on the same network, data, batch size and epoch budget as KFAC-VI, for the
uncertainty comparison (``kfacvi baseline``, then ``kfacvi analyze``):

* ``adam`` / ``sgd``: a deterministic network trained on the cross-entropy (maximum likelihood);
  its predictive is the softmax of the one network (S = 1);
* ``mc-dropout`` (Gal & Ghahramani 2016): LeNet5 with dropout on the inputs of its linear layers,
  trained with Adam; at test time dropout stays on and the predictive averages S stochastic
  forward passes, p(y | x) ≈ (1/S) Σ_s softmax(f(x; θ ⊙ m_s));
* ``mean-field``: Pyro's SVI with an ``AutoNormal`` guide (a fully factorised Gaussian
  q(θ) = Π_i N(μ_i, σ_i²)) on the same :class:`~pyro_kfacvi.BayesianModel` (prior N(0, ηI),
  likelihood scaled to the data set), ``Trace_ELBO`` with one particle and ``pyro.optim.Adam``;
  the predictive averages the softmax over S draws from q, as eq. (1);
* ``ivon`` and ``laplace``: the peers users would pick instead, IVON and Kronecker Laplace, from
  their own packages (the optional extra ``[peers]``; :mod:`pyro_kfacvi.experiments.peers`).

Every method exposes ``step(x, y)`` (one optimiser step, returns the loss per datum) and
``samples(x, num_samples)``: per-sample class probabilities ``(S, N, C)``, with
``num_samples = 0`` the cheap point prediction (dropout off; the posterior mean μ). A method whose
posterior is fitted after training (``laplace``) also has ``fit_posterior(split)``, called once
after the last epoch: it returns what the ``final`` record keeps, and from then on
``samples(x, 0)`` is its named ``point_predictive`` (Laplace's GLM-probit predictive), recorded in
``final`` as ``<point_predictive>_test_*`` beside the S-sample ``test_*``.

Example::

    config = BaselineConfig(method="mc-dropout", epochs=15)
    history, final = train(config, cifar10(root), out_dir="runs/lenet5-mc-dropout")
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
from pyro import poutine
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from ..likelihoods import Categorical
from ..model import BayesianModel
from . import peers
from .models import MODELS, build_model
from .checkpoints import CHECKPOINT, METRICS, atomic_write, load_checkpoint
from .evaluation import private_rng, scores, seed_everything

__all__ = ["METHODS", "BaselineConfig", "Deterministic", "MCDropout", "MeanField", "build", "from_checkpoint", "is_baseline",
           "train"]

#: method → what it trains.
METHODS = {
    "adam": "deterministic network, cross-entropy, Adam",
    "sgd": "deterministic network, cross-entropy, SGD with momentum",
    "mc-dropout": "dropout on the linear layers' inputs, cross-entropy, Adam; dropout on at test time",
    "mean-field": "Pyro SVI, AutoNormal guide on BayesianModel, Trace_ELBO, Adam",
    "ivon": "IVON (ivon-opt): diagonal Gaussian by variational online Newton, cosine learning-rate decay",
    "laplace": "Kronecker Laplace (laplace-torch) on the adam network, marginal-likelihood prior precision",
}
#: learning rate when ``BaselineConfig.lr`` is None (ivon: its authors' CIFAR-10 setting).
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "mc-dropout": 1e-3, "mean-field": 1e-3, "ivon": 0.2, "laplace": 1e-3}
#: weight decay when ``BaselineConfig.weight_decay`` is None (0 for the methods not listed).
DEFAULT_WEIGHT_DECAY = {"ivon": 2e-4}
#: checkpoint ``kind`` that tells baseline checkpoints from KFAC-VI ones.
KIND = "baseline"
_BATCH = 1000  # rows per forward pass at test time


@dataclass(frozen=True)
class BaselineConfig:
    """Hyperparameters of one baseline run."""

    method: str = "adam"
    model: str = "lenet5"
    #: LeNet5 convolution channels / hidden units; ``None``: the network's default.
    channels: tuple[int, ...] | None = None
    hidden: tuple[int, ...] | None = None
    lr: float | None = None  # None: DEFAULT_LR[method]
    momentum: float = 0.9  # sgd; ivon's β1
    weight_decay: float | None = None  # adam, sgd, mc-dropout, laplace (L2 added to the gradient), ivon's δ
    hess_init: float = 0.5  # ivon: initial Hessian h_0 (its authors' CIFAR-10 setting)
    beta2: float = 0.99999  # ivon: β2, the Hessian's moving average
    ess: float | None = None  # ivon: effective sample size λ; None: the training set size N
    dropout: float = 0.25  # mc-dropout
    prior_variance: float = 1.0  # mean-field: η
    init_scale: float = 1e-3  # mean-field: initial σ_i of q (μ starts at the network's initialisation)
    test_samples: int = 50  # S of the final evaluation
    epochs: int = 15
    batch_size: int = 64
    train_subset: int | None = None
    validation: int | None = None  # tuning: evaluate on the last n training images, not the test set
    train_eval_size: int = 5000
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"invalid BaselineConfig: method {self.method!r} unknown; choose from {', '.join(METHODS)}")
        if self.model.lower() not in MODELS:
            raise ValueError(f"invalid BaselineConfig: model {self.model!r} unknown")
        if self.method == "mc-dropout" and (self.model.lower() != "lenet5" or not 0 < self.dropout < 1):
            raise ValueError("invalid BaselineConfig: mc-dropout needs model 'lenet5' and 0 < dropout < 1")
        for name in ("epochs", "batch_size", "train_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid BaselineConfig: {name} must be >= 1")
        if self.test_samples < 0 or not self.init_scale > 0 or not self.prior_variance > 0:
            raise ValueError("invalid BaselineConfig: test_samples >= 0, init_scale > 0, prior_variance > 0")
        if not self.hess_init > 0 or not 0 <= self.beta2 <= 1 or not (self.ess is None or self.ess > 0):
            raise ValueError("invalid BaselineConfig: hess_init > 0, 0 <= beta2 <= 1, ess > 0 or None")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def decay(self) -> float:
        """The weight decay: ``weight_decay``, or the method's default (:data:`DEFAULT_WEIGHT_DECAY`)."""
        return DEFAULT_WEIGHT_DECAY.get(self.method, 0.0) if self.weight_decay is None else self.weight_decay

    def net(self):
        """A freshly initialised network (from the global torch RNG)."""
        kwargs = {k: tuple(v) for k in ("channels", "hidden") if (v := getattr(self, k)) is not None}
        if self.method == "mc-dropout":
            kwargs["dropout"] = self.dropout
        return build_model(self.model, **kwargs)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> BaselineConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _batched(x, forward):
    """``forward`` over row blocks of ``x``, outputs ``(S, B, C)`` joined along the data axis."""
    return torch.cat([forward(xb) for xb in x.split(_BATCH)], 1)


class Deterministic:
    """One network trained on the cross-entropy; its predictive is its softmax (S = 1)."""

    def __init__(self, config: BaselineConfig, net):
        self.net = net
        params = net.parameters()
        lr, wd = config.learning_rate, config.decay
        self.optimizer = (torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
                          if config.method == "sgd" else torch.optim.Adam(params, lr=lr, weight_decay=wd))

    def step(self, x, y):
        self.net.train()
        loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def samples(self, x, num_samples):
        self.net.eval()
        return _batched(x, lambda xb: self.net(xb).softmax(-1).unsqueeze(0))

    def state_dict(self):
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


class MCDropout(Deterministic):
    """Dropout kept on at test time: S stochastic forward passes (``num_samples = 0``: dropout off)."""

    @torch.no_grad()
    def samples(self, x, num_samples):
        if num_samples == 0:
            return super().samples(x, 0)
        self.net.train()
        return _batched(x, lambda xb: torch.stack([self.net(xb).softmax(-1) for _ in range(num_samples)]))


class MeanField:
    """Pyro SVI with ``AutoNormal`` on :class:`~pyro_kfacvi.BayesianModel`: the negative ELBO

    .. math:: -\\mathcal L = -\\tfrac{N}{B}\\textstyle\\sum_{n \\in B} \\log p(y_n \\mid x_n, θ)
              + \\log q(θ) - \\log p(θ), \\qquad θ \\sim q = \\textstyle\\prod_i N(μ_i, σ_i^2),

    one sample per step, Adam on (μ, log σ). μ starts at the network's initialisation."""

    def __init__(self, config: BaselineConfig, net, example, num_data):
        pyro.clear_param_store()
        self.model = BayesianModel(net, Categorical(), config.prior_variance, num_data)
        init = {name: p.detach().clone() for name, (_, _, p) in self.model.weight_sites().items()}
        self.guide = AutoNormal(poutine.block(self.model, hide=["obs"]), init_loc_fn=init_to_value(values=init),
                                init_scale=config.init_scale)
        self.guide(example)  # sets up the guide's parameters
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": config.learning_rate}), Trace_ELBO())

    def step(self, x, y):
        return self.svi.step(x, y) / self.model.num_data

    @torch.no_grad()
    def samples(self, x, num_samples):
        if num_samples == 0:
            draws = [self.guide.median()]
        else:
            draws = [self.guide() for _ in range(num_samples)]
        weights = {name: torch.stack([d[name] for d in draws]) for name in draws[0]}
        return _batched(x, lambda xb: self.model.output(xb, weights).reshape(len(draws), xb.shape[0], -1).softmax(-1))

    def state_dict(self):
        return {"guide": self.guide.state_dict(), "optimizer": self.svi.optim.get_state()}

    def load_state_dict(self, state):
        self.guide.load_state_dict(state["guide"])
        self.svi.optim.set_state(state["optimizer"])


def build(config: BaselineConfig, example, num_data):
    """The method object for ``config``; ``example`` is an input batch (sets up Pyro's guide).
    A peer method without its package raises :class:`~pyro_kfacvi.experiments.peers.PeerNotInstalled`."""
    net = config.net().to(example.device)
    if config.method == "mean-field":
        return MeanField(config, net, example, num_data)
    if config.method == "ivon":
        return peers.IVON(config, net, num_data)
    if config.method == "laplace":
        return peers.KroneckerLaplace(Deterministic(config, net))
    return (MCDropout if config.method == "mc-dropout" else Deterministic)(config, net)


def _evaluate(method, split, num_samples, seed, prefix):
    with private_rng(seed, split.images.device):
        probs = method.samples(split.images, num_samples).mean(0)
    return scores(probs, split.labels, prefix)


def train(config: BaselineConfig, data, out_dir=None, log=print):
    """Train ``config`` on ``data.train`` for ``config.epochs`` epochs; evaluate the point
    prediction on ``data.test`` after every epoch and the S-sample predictive at the end.

    Writes ``out_dir/checkpoint.pt`` (readable by :func:`from_checkpoint` and ``kfacvi analyze``)
    and ``out_dir/metrics.json``. Returns ``(history, final)``."""
    data = data if config.validation is None else data.holdout(config.validation)
    train_split = data.train if config.train_subset is None else data.train.subset(config.train_subset)
    train_eval = train_split.subset(min(config.train_eval_size, len(train_split)))
    seed_everything(config.seed)
    method = build(config, train_split.images[:1], len(train_split))
    generator = torch.Generator().manual_seed(config.seed)
    history, elapsed = [], 0.0
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        losses = [method.step(x, y) for x, y in train_split.batches(config.batch_size, generator=generator)]
        record = {"epoch": epoch, "loss": sum(losses) / len(losses)}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"{config.method} diverged in epoch {epoch}")
        record.update(_evaluate(method, train_eval, 0, config.seed + epoch, "train_"))
        record.update(_evaluate(method, data.test, 0, config.seed + epoch, "test_"))
        record["time"] = time.perf_counter() - start
        elapsed += record["time"]
        history.append(record)
        if log is not None:
            log(f"epoch {epoch:3d}  loss {record['loss']:.4f}  train_acc {record['train_acc']:.4f}  test_acc "
                f"{record['test_acc']:.4f}  nll {record['test_nll']:.4f}  ece {record['test_ece']:.4f}  ({record['time']:.1f}s)")
    start = time.perf_counter()
    final = {"test_samples": config.test_samples, "epochs": config.epochs}
    fit_posterior = getattr(method, "fit_posterior", None)  # a posterior fitted after training (module doc)
    if fit_posterior is not None:
        final.update(fit_posterior(train_split))
        final.update(_evaluate(method, data.test, 0, config.seed, f"{method.point_predictive}_test_"))
    final.update(_evaluate(method, data.test, config.test_samples, config.seed, "test_"))
    final["wall_time"] = elapsed + time.perf_counter() - start
    if log is not None:
        log(f"final (S={config.test_samples}): " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                              if k not in ("test_samples", "epochs", "wall_time")))
    if out_dir is not None:
        _save(Path(out_dir), config, method, len(train_split), history, final)
    return history, final


def _save(out_dir: Path, config, method, num_data, history, final):
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": 1, "kind": KIND, "config": config.to_dict(), "num_data": num_data,
             "state": method.state_dict(), "history": history, "final": final}
    atomic_write(out_dir / CHECKPOINT, lambda f: torch.save(state, f))
    text = json.dumps({"config": config.to_dict(), "epochs": history, "final": final}, indent=2) + "\n"
    atomic_write(out_dir / METRICS, lambda f: f.write(text.encode()))


def is_baseline(state: dict) -> bool:
    """Whether a loaded checkpoint was written by :func:`train`."""
    return state.get("kind") == KIND


def from_checkpoint(path_or_state, example):
    """``(config, method)`` restored from a checkpoint written by :func:`train`; ``example``: an
    input batch on the device to use."""
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state, example.device)
    if not is_baseline(state):
        raise ValueError("not a baseline checkpoint (kfacvi train writes the other kind)")
    config = BaselineConfig.from_dict(state["config"])
    method = build(config, example, state["num_data"])
    method.load_state_dict(state["state"])
    return config, method
