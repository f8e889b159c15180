"""A ``torch.nn.Module`` as a Pyro model with an isotropic Gaussian prior on its weights."""
import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .layers import find_layers, run_sampled


class BayesianModel(nn.Module):
    r"""The Pyro model

    .. math:: θ \sim N(0, ηI), \qquad y_n \mid x_n, θ \sim p(y \mid f(x_n; θ)),\; n = 1..N,

    where every trainable parameter of ``net`` is a ``pyro.sample`` site named like the parameter
    (``"features.0.weight"``) and the likelihood of a minibatch is scaled by N / B through a
    subsampled ``pyro.plate`` of size ``num_data``. Parameters with ``requires_grad=False`` are
    not sites: they keep their values (:func:`~pyro_kfacvi.layers.find_layers`).

    ``bayesian`` chooses the layers whose posterior is a distribution — module names, e.g.
    ``["fc3"]``, or a predicate on ``(name, module)``; default: every layer with sites, as
    laplace-torch's ``subset_of_weights``. A guide gives the other layers' sites a point mass at
    their mean (MAP under the same prior), trained by the same natural-gradient engine.

    ``model(x, y=None)`` follows the usual contract: it works under ``poutine.trace``,
    ``pyro.infer.Predictive`` (also ``parallel=True``) and ``Trace_ELBO(vectorize_particles=True)``:
    weights with leading sample dimensions run as M networks at once (see
    :mod:`pyro_kfacvi.layers`). The network output is recorded as the deterministic site
    ``"output"`` (logits or regression mean) and the labels as ``"obs"``.

    ``prior_variance="auto"`` learns η by empirical Bayes (variational EM): after every step the
    engine calls :meth:`update_hyperparameters`, which sets η to the maximiser of the ELBO's prior
    term E_q[log N(θ; 0, ηI)],

    .. math:: η = E_q‖θ‖^2 / P = (‖μ‖^2 + \mathrm{tr}\,Σ) / P

    over all P weights (:meth:`KroneckerGuide.second_moment
    <pyro_kfacvi.guides.KroneckerGuide.second_moment>`). η is global — one prior N(0, ηI), as with a
    fixed η: the KL, the ELBO-exact posterior's intrinsic damping π = κ/(Nη) and the guide's
    memoised spectral terms all take one η, and one η pools all P weights into its estimate
    (a layer's bias alone has a few). It starts at η = 1, the unit Gaussian prior. For a
    linear-Gaussian model with q the exact posterior these updates are EM for the evidence
    p(D | η) and converge to its maximiser (tested). η only shapes the posterior of the ELBO-exact
    :class:`~pyro_kfacvi.KroneckerNormal`; the other families' prior acts through the engine's
    weight decay, and there η changes only the reported loss (a warning says so).

    :param net: a network built from ``Linear``, ``Conv2d`` and ``BatchNorm1d/2d`` layers and
        parameter-free operations; its current parameters are used only for their shapes (and
        by :class:`~pyro_kfacvi.KroneckerGuide` as the initial posterior mean).
    :param likelihood: :class:`~pyro_kfacvi.likelihoods.Categorical` or
        :class:`~pyro_kfacvi.likelihoods.Gaussian` (a submodule: moved to the network's dtype and
        device, its learned noise saved in ``state_dict()``).
    :param prior_variance: η, a positive float, or ``"auto"`` (above).
    :param int num_data: N, the size of the training set.
    :param bayesian: ``None`` (every layer), a list of layer names, or a predicate ``(name, module)``.
    """

    def __init__(self, net, likelihood, prior_variance, num_data, bayesian=None):
        super().__init__()
        self.learns_prior = isinstance(prior_variance, str)
        if self.learns_prior and prior_variance != "auto":
            raise ValueError(f"prior_variance must be a positive number or 'auto', got {prior_variance!r}")
        if not self.learns_prior and (not prior_variance > 0 or not math.isfinite(prior_variance)):
            raise ValueError(f"prior_variance must be positive and finite, got {prior_variance}")
        if int(num_data) != num_data or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data}")
        self.net = net
        self.layers = find_layers(net)
        reference = next(net.parameters())
        self.likelihood = likelihood.to(dtype=reference.dtype, device=reference.device)
        self._prior_variance = INITIAL_PRIOR_VARIANCE if self.learns_prior else float(prior_variance)
        if self.learns_prior:  # the state; _prior_variance is its value as a number, kept in step with it
            self.register_buffer("learned_prior_variance", torch.tensor(self._prior_variance, dtype=torch.float64))
            self.register_load_state_dict_post_hook(_read_learned_prior)
        self.num_data = int(num_data)
        self.bayesian_layers = self._chosen_layers(bayesian)
        self._output_shapes = {}  # (example shape, dtype, device) -> output shape of one example

    def _chosen_layers(self, bayesian):
        """The names of the layers with a posterior distribution (class doc), in network order."""
        candidates = [layer for layer, (module, adapter) in self.layers.items() if adapter.param_names(module)]
        if bayesian is None:
            return candidates
        if callable(bayesian):
            return [layer for layer in candidates if bayesian(layer, self.layers[layer][0])]
        unknown = sorted(set(bayesian) - set(candidates))
        if unknown:
            raise ValueError(f"bayesian names {unknown}, which are not layers with trainable parameters of this "
                             f"network; choose from {candidates}")
        return [layer for layer in candidates if layer in set(bayesian)]

    def is_bayesian(self, layer):
        """Whether layer ``layer``'s posterior is a distribution (else a point mass)."""
        return layer in self.bayesian_layers

    @property
    def prior_variance(self):
        """η, a float: the given one, or the learned one under ``prior_variance="auto"``. Settable to a
        positive number (e.g. to calibrate a Laplace posterior, ``KroneckerNormal.from_guide``); under
        ``"auto"`` the next step learns it again."""
        return self._prior_variance

    @prior_variance.setter
    def prior_variance(self, value):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"prior_variance must be positive and finite, got {value}")
        if self.learns_prior:
            self.set_learned_prior_variance(value)
        else:
            self._prior_variance = float(value)

    @property
    def num_parameters(self):
        """P, the number of weights with a prior (all weight sites)."""
        return sum(p.numel() for _, _, p in self.weight_sites().values())

    def config(self):
        """The constructor's arguments but the network and the likelihood (which has its own
        ``config()``): what :func:`pyro_kfacvi.io.load` rebuilds the model from."""
        return {"prior_variance": "auto" if self.learns_prior else self.prior_variance, "num_data": self.num_data,
                "bayesian": list(self.bayesian_layers)}

    def weight_sites(self):
        """``{site name: (layer name, parameter name, parameter)}`` in network order."""
        sites = {}
        for layer, (module, adapter) in self.layers.items():
            for param in adapter.param_names(module):
                sites[f"{layer}.{param}" if layer else param] = (layer, param, getattr(module, param))
        return sites

    def forward(self, x, y=None):
        self.check_batch(x, y)
        sites = self.weight_sites()
        scale = math.sqrt(self.prior_variance)
        weights = {
            name: pyro.sample(name, dist.Normal(torch.zeros_like(p), scale).to_event(p.dim()))
            for name, (_, _, p) in sites.items()
        }
        output = self.output(x, weights)
        pyro.deterministic("output", output)
        subsample = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", self.num_data, subsample=subsample):
            return pyro.sample("obs", self.likelihood.distribution(output), obs=y)

    def output(self, x, weights):
        """Network output for weights with any leading sample shape.

        A weight site drawn outside the data plate under a particle or sample plate has shape
        ``(P, 1, *param.shape)``; its output is ``(P, B, ...)``, ready for the data plate.
        """
        sites = self.weight_sites()
        sample_shape = torch.broadcast_shapes(*(weights[n].shape[: weights[n].dim() - p.dim()] for n, (_, _, p) in sites.items()))
        num_samples = math.prod(sample_shape)
        flat = {name: weights[name].expand(*sample_shape, *p.shape).reshape(num_samples, *p.shape)
                for name, (_, _, p) in sites.items()}
        out = run_sampled(self.net, self.layers, self.layer_params(flat), x, num_samples)
        out = out.reshape(*sample_shape, *out.shape[1:])
        if sample_shape and sample_shape[-1] == 1:
            out = out.squeeze(len(sample_shape) - 1)
        return out

    def layer_params(self, weights):
        """``{weight site: value}`` → ``{layer name: {parameter name: value}}``, as the layers take them."""
        params = {}
        for name, (layer, param, _) in self.weight_sites().items():
            params.setdefault(layer, {})[param] = weights[name]
        return params

    def update_hyperparameters(self, stats, guide):
        """Called by the engine after each committed step with the step's statistics (means) and the
        guide: the likelihood learns from its statistics (the noise of ``Gaussian(scale=None)``), and
        under ``prior_variance="auto"`` η ← (‖μ‖² + tr Σ)/P (class doc; one host synchronisation)."""
        self.likelihood.update(stats.likelihood_stats)
        if self.learns_prior:
            if guide.prior_precision == 0:
                warnings.warn(f"prior_variance='auto' learns η, but a {type(guide).__name__} does not use η in its "
                              "update (its prior acts through the engine's weight_decay): only the reported loss "
                              "changes. KroneckerNormal(model) (ELBO-exact) uses it.", stacklevel=3)
            self.set_learned_prior_variance(float(guide.second_moment()) / self.num_parameters)

    @torch.no_grad()
    def set_learned_prior_variance(self, value):
        """Set the learned η (``prior_variance="auto"``): its buffer and its value as a number."""
        self.learned_prior_variance.fill_(value)
        self._prior_variance = float(value)

    def check_batch(self, x, y=None):
        """Shape checks that need no host synchronisation."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must hold a non-empty batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        output_shape = self.output_shape(x)
        if y is not None:
            if not torch.is_tensor(y):
                raise TypeError(f"y must be a tensor, got {type(y).__name__}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"x and y hold different numbers of examples: {x.shape[0]} and {y.shape[0]}")
            self.likelihood.check_targets(y, output_shape)
            if x.shape[0] > self.num_data:
                raise ValueError(f"the batch ({x.shape[0]} examples) is larger than num_data={self.num_data}")

    def output_shape(self, x):
        """Shape of the network's output for one example of ``x``, cached per example shape.

        Found by running the network once on ``x[:1]`` in eval mode (no random numbers drawn, no
        BatchNorm statistics moved); inputs the network cannot take raise a ``ValueError``."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._output_shapes:
            training = self.net.training
            self.net.eval()
            try:
                with torch.no_grad():
                    self._output_shapes[key] = tuple(self.net(x[:1]).shape[1:])
            except RuntimeError as exc:
                raise ValueError(
                    f"the network cannot take inputs of shape {key[0]} per example ({exc}); pass x shaped "
                    "(batch, ...) as the network expects, e.g. (B, 3, 32, 32) for the CIFAR-10 networks") from exc
            finally:
                self.net.train(training)
        return self._output_shapes[key]

    def check_values(self, x, y=None):
        """Value checks, at the cost of one host synchronisation: every input finite and every
        target (if given) in the likelihood's support (class labels in 0..C−1 for C network outputs,
        finite regression targets)."""
        output_shape = self.output_shape(x)
        # NaN and ±Inf propagate through the sum; a sum that overflowed is checked exactly
        checks = [x.sum(dtype=torch.promote_types(x.dtype, torch.float32))]
        if y is not None:
            bad_targets = self.likelihood.invalid_targets(y, output_shape)
            checks.append(bad_targets.any())
        input_sum, *any_bad_targets = torch.stack(checks).tolist()
        bad_inputs = None if math.isfinite(input_sum) else ~torch.isfinite(x.flatten(1)).all(1)
        if bad_inputs is not None and bad_inputs.any():
            num_bad_inputs, first = int(bad_inputs.sum()), int(bad_inputs.nonzero()[0])
            raise ValueError(f"x holds NaN or Inf in {num_bad_inputs} of its {x.shape[0]} examples (the first at "
                             f"index {first}); repair or drop those examples")
        if any(any_bad_targets):
            num_bad_targets, first = int(bad_targets.sum()), int(bad_targets.nonzero()[0])
            raise ValueError(f"y holds {num_bad_targets} targets outside {self.likelihood.support(output_shape)} "
                             f"(the first at index {first}: {y[first].tolist()}); {self.likelihood.remedy}")


INITIAL_PRIOR_VARIANCE = 1.0  # η of prior_variance="auto" before the first step


def _read_learned_prior(model, incompatible_keys):
    """After ``load_state_dict``: η as a number from the loaded buffer."""
    model._prior_variance = float(model.learned_prior_variance)
