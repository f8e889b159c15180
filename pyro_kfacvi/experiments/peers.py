r"""The peers users would pick instead of KFAC-VI, from their own packages, as baselines of
:mod:`pyro_kfacvi.experiments.baselines` (the same ``step`` / ``samples`` / ``state_dict``
contract, run folder and ``kfacvi analyze``). They are the optional extra ``[peers]``::

    pip install torch==2.14.1 -e ".[peers]"     # ivon-opt, laplace-torch; keeps this torch

* ``ivon`` — IVON (Shen et al. 2024, "Variational Learning is Effective for Large Deep
  Networks"; package ``ivon-opt``): a diagonal Gaussian q(θ) = N(m, diag(1/(λ(h + δ)))) learned
  at Adam's cost. Each step draws one θ ~ q, takes the gradient of the mean cross-entropy there
  (inside ``IVON.sampled_params(train=True)``) and updates m, the momentum and the Hessian
  estimate h. Defaults, its authors' CIFAR-10 settings (team-approx-bayes/ivon-experiments):
  learning rate 0.2 decayed by a cosine to 0 over all steps, h₀ = 0.5, weight decay δ = 2e-4,
  β1 = 0.9, β2 = 0.99999, effective sample size λ = N (the training set size). The authors warm
  up for 5 of their 200 epochs and decay per epoch; here the cosine is per step, without warm-up.
  Predictive: eq. (1) over S draws θ_s ~ q (``sampled_params()``); S = 0: the mean m.
* ``laplace`` — Kronecker-factored Laplace (Ritter et al. 2018; Daxberger et al. 2021, package
  ``laplace-torch``) on the MAP network: the ``adam`` baseline trains θ_MAP with the same steps,
  then ``Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron")``
  fits on the training split the posterior N(θ_MAP, P⁻¹), P = Σ_n J_nᵀ Λ_n J_n + δI with the GGN
  Kronecker-factored per layer (laplace-torch's default curvlinops back-end: K-FAC-expand, the
  exact GGN of each minibatch, weight and bias as separate blocks). The prior precision δ is one
  scalar (``prior_structure="scalar"``, passed explicitly) that maximises the Laplace log
  marginal likelihood

  .. math:: \log p(D \mid δ) ≈ \log p(D \mid θ_{MAP}) - \tfrac12\,(δ\,‖θ_{MAP}‖^2
            + \log\det P - P_θ \log δ)

  (``optimize_prior_precision(method="marglik")``: Adam on log δ from δ = 1, :data:`MARGLIK_STEPS`
  steps of learning rate :data:`MARGLIK_LR`). Two predictives:

  - GLM-probit (``samples(x, 0)``): the linearised network's logits N(f(x; θ_MAP), J P⁻¹ Jᵀ)
    through the probit approximation, p(y | x) ≈ softmax(f / sqrt(1 + (π/8) diag(J P⁻¹ Jᵀ)))
    (``pred_type="glm", link_approx="probit"``): one probability vector per image, so S = 1 for
    ``kfacvi analyze --test-samples 0`` (its mutual information is 0). Its Jacobians take memory
    quadratic in the number of images per call, so it runs on :data:`GLM_ROWS` images at a time.
  - MC (``samples(x, S)``, S > 0): eq. (1) over S weight samples θ_s ~ N(θ_MAP, P⁻¹)
    (``Laplace.sample``) through the network.

Each method draws its weight samples from torch's global RNG, once per ``samples`` call, so the
same S samples serve every image of the call and a seed reproduces them.
"""
from __future__ import annotations

import importlib
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["GLM_ROWS", "INSTALL", "IVON", "KroneckerLaplace", "PACKAGES", "PeerNotInstalled", "require"]

#: the command that installs the peers next to this torch.
INSTALL = 'pip install torch==2.14.1 -e ".[peers]"'
#: peer method → (module, distribution) of its package.
PACKAGES = {"ivon": ("ivon", "ivon-opt"), "laplace": ("laplace", "laplace-torch")}
#: images per GLM-predictive call (laplace-torch's Jacobians: memory and time grow with its square;
#: 8 costs ~25 ms per LeNet5 image on one CPU thread, 32 four times as much).
GLM_ROWS = 8
#: images per minibatch of the Laplace fit (the factors are sums: any size gives the same P).
FIT_ROWS = 500
#: the marginal-likelihood optimisation of the prior precision: Adam steps and learning rate on log δ.
MARGLIK_STEPS, MARGLIK_LR = 500, 0.1
_ROWS = 1000  # images per forward pass of a prediction


class PeerNotInstalled(ImportError):
    """A peer method's package cannot be imported; the message says what to install."""


def require(method):
    """The package module of the peer ``method`` (``None`` for the library's own baselines).

    :raises PeerNotInstalled: if the package cannot be imported; the message names it and :data:`INSTALL`.
    """
    if method not in PACKAGES:
        return None
    module, distribution = PACKAGES[method]
    try:
        with warnings.catch_warnings():  # the torch.jit deprecations their dependencies trigger on import
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(module)
    except ImportError as exc:
        raise PeerNotInstalled(f"the {method} baseline needs the package {distribution} (the optional extra "
                               f"[peers]): {INSTALL}") from exc


def _softmax(net, x):
    """Class probabilities ``(N, C)`` of ``net`` at its current weights, ``_ROWS`` images at a time."""
    return torch.cat([net(xb).softmax(-1) for xb in x.split(_ROWS)])


class IVON:
    """IVON (module doc) on ``net``: ``config`` gives the hyperparameters (a
    :class:`~pyro_kfacvi.experiments.baselines.BaselineConfig`), ``num_data`` is N."""

    def __init__(self, config, net, num_data):
        ivon = require("ivon")
        self.net = net
        self.optimizer = ivon.IVON(net.parameters(), lr=config.learning_rate, ess=config.ess or num_data,
                                   hess_init=config.hess_init, beta1=config.momentum, beta2=config.beta2,
                                   weight_decay=config.decay)
        steps = config.epochs * math.ceil(num_data / config.batch_size)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)

    def step(self, x, y):
        """One IVON step: the gradient at one θ ~ q (the backward runs inside ``sampled_params``)."""
        self.net.train()
        with self.optimizer.sampled_params(train=True):
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.net(x), y)
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    @torch.no_grad()
    def samples(self, x, num_samples):
        """``(S, N, C)``: the softmax at S draws θ_s ~ q; ``num_samples = 0``: at the mean m (S = 1)."""
        self.net.eval()
        if num_samples == 0:
            return _softmax(self.net, x).unsqueeze(0)
        draws = []
        for _ in range(num_samples):
            with self.optimizer.sampled_params():
                draws.append(_softmax(self.net, x))
        return torch.stack(draws)

    def state_dict(self):
        # IVON keeps its step count (its momentum's debiasing) outside its state_dict
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "iteration": self.optimizer.current_step}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.current_step = state["iteration"]


class KroneckerLaplace:
    """Kronecker Laplace (module doc) around ``map_method``, the ``adam`` baseline's
    :class:`~pyro_kfacvi.experiments.baselines.Deterministic`, which trains θ_MAP. Until
    :meth:`fit_posterior` its predictive is the MAP network's softmax (S = 1)."""

    #: what ``samples(x, 0)`` is once the posterior is fitted (``final`` keys ``glm_probit_test_*``).
    point_predictive = "glm_probit"

    def __init__(self, map_method):
        self.package = require("laplace")
        self.map = map_method
        self.laplace = None  # set by fit_posterior or load_state_dict

    def step(self, x, y):
        return self.map.step(x, y)

    def _posterior(self):
        return self.package.Laplace(self.map.net, "classification", subset_of_weights="all",
                                    hessian_structure="kron")

    def fit_posterior(self, split):
        """Fit P on ``split`` (images and labels) at the current weights θ_MAP and δ by marginal
        likelihood; returns δ, the log marginal likelihood and the seconds taken."""
        start = time.perf_counter()
        laplace = self._posterior()
        laplace.fit(DataLoader(TensorDataset(split.images, split.labels), batch_size=FIT_ROWS))
        with warnings.catch_warnings():  # its reminder that the predictive defaults to probit: marglik uses none
            warnings.filterwarnings("ignore", "By default `link_approx`")
            laplace.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar",
                                             n_steps=MARGLIK_STEPS, lr=MARGLIK_LR, init_prior_prec=1.0)
        self.laplace = laplace
        with torch.no_grad():
            log_marglik = laplace.log_marginal_likelihood().item()
        return {"prior_precision": laplace.prior_precision.item(), "log_marginal_likelihood": log_marglik,
                "fit_time": time.perf_counter() - start}

    @torch.no_grad()
    def samples(self, x, num_samples):
        """``(S, N, C)``: the MC predictive's S weight samples; ``num_samples = 0``: the GLM-probit
        predictive (S = 1). Before :meth:`fit_posterior`: the MAP network's softmax (S = 1)."""
        if self.laplace is None:
            return self.map.samples(x, num_samples)
        if num_samples == 0:
            return torch.cat([self.laplace(xb, pred_type="glm", link_approx="probit")
                              for xb in x.split(GLM_ROWS)]).unsqueeze(0)
        draws, params = self.laplace.sample(num_samples), self.laplace.params
        probs = []
        try:
            for draw in draws:
                vector_to_parameters(draw, params)
                probs.append(self.map.samples(x, 0)[0])
        finally:
            vector_to_parameters(self.laplace.mean.clone(), params)
        return torch.stack(probs)

    def state_dict(self):
        return {"map": self.map.state_dict(), "laplace": None if self.laplace is None else self.laplace.state_dict()}

    def load_state_dict(self, state):
        self.map.load_state_dict(state["map"])
        self.laplace = None
        if state["laplace"] is not None:
            self.laplace = self._posterior()
            self.laplace.load_state_dict(state["laplace"])
