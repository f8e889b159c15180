"""A ``torch.nn.Module`` as a Pyro model with an isotropic Gaussian prior on its weights."""
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .layers import find_layers, run_sampled


class BayesianModel(nn.Module):
    r"""The Pyro model

    .. math:: θ \sim N(0, ηI), \qquad y_n \mid x_n, θ \sim p(y \mid f(x_n; θ)),\; n = 1..N,

    where every parameter of ``net`` is a ``pyro.sample`` site named like the parameter
    (``"features.0.weight"``) and the likelihood of a minibatch is scaled by N / B through a
    subsampled ``pyro.plate`` of size ``num_data``.

    ``model(x, y=None)`` follows the usual contract: it works under ``poutine.trace``,
    ``pyro.infer.Predictive`` (also ``parallel=True``) and ``Trace_ELBO(vectorize_particles=True)``:
    weights with leading sample dimensions run as M networks at once (see
    :mod:`pyro_kfacvi.layers`). The network output is recorded as the deterministic site
    ``"output"`` (logits or regression mean) and the labels as ``"obs"``.

    :param net: a network built from ``Linear``, ``Conv2d`` and ``BatchNorm1d/2d`` layers and
        parameter-free operations; its current parameters are used only for their shapes (and
        by :class:`~pyro_kfacvi.KroneckerGuide` as the initial posterior mean).
    :param likelihood: :class:`~pyro_kfacvi.likelihoods.Categorical` or
        :class:`~pyro_kfacvi.likelihoods.Gaussian`.
    :param float prior_variance: η.
    :param int num_data: N, the size of the training set.
    """

    def __init__(self, net, likelihood, prior_variance, num_data):
        super().__init__()
        if not prior_variance > 0 or not math.isfinite(prior_variance):
            raise ValueError(f"prior_variance must be positive and finite, got {prior_variance}")
        if int(num_data) != num_data or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data}")
        self.net = net
        self.likelihood = likelihood
        self.prior_variance = float(prior_variance)
        self.num_data = int(num_data)
        self.layers = find_layers(net)
        self._output_shapes = {}  # (example shape, dtype, device) -> output shape of one example

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
        params = {}
        for name, (layer, param, p) in sites.items():
            value = weights[name].expand(*sample_shape, *p.shape).reshape(num_samples, *p.shape)
            params.setdefault(layer, {})[param] = value
        out = run_sampled(self.net, self.layers, params, x, num_samples)
        out = out.reshape(*sample_shape, *out.shape[1:])
        if sample_shape and sample_shape[-1] == 1:
            out = out.squeeze(len(sample_shape) - 1)
        return out

    def update_hyperparameters(self, stats, guide):
        """Called by the engine after each committed step with the step's statistics (means) and the
        guide: the place for hyperparameters learned during training. Nothing to do yet."""

    def check_batch(self, x, y=None):
        """Shape checks that need no host synchronisation."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must hold a non-empty batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if y is not None:
            if not torch.is_tensor(y):
                raise TypeError(f"y must be a tensor, got {type(y).__name__}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"x and y hold different numbers of examples: {x.shape[0]} and {y.shape[0]}")
            self.likelihood.check_targets(y)
            if x.shape[0] > self.num_data:
                raise ValueError(f"the batch ({x.shape[0]} examples) is larger than num_data={self.num_data}")
        self.output_shape(x)

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

    def check_values(self, x, y):
        """Value checks, at the cost of one host synchronisation: every input finite and every
        target in the likelihood's support (class labels in 0..C−1 for C network outputs)."""
        output_shape = self.output_shape(x)
        bad_targets = self.likelihood.invalid_targets(y, output_shape)
        # NaN and ±Inf propagate through the sum; a sum that overflowed is checked exactly
        input_sum = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
        input_sum, any_bad_targets = torch.stack([input_sum, bad_targets.any()]).tolist()
        bad_inputs = None if math.isfinite(input_sum) else ~torch.isfinite(x.flatten(1)).all(1)
        if bad_inputs is not None and bad_inputs.any():
            num_bad_inputs, first = int(bad_inputs.sum()), int(bad_inputs.nonzero()[0])
            raise ValueError(f"x holds NaN or Inf in {num_bad_inputs} of its {x.shape[0]} examples (the first at "
                             f"index {first}); repair or drop those examples")
        if any_bad_targets:
            num_bad_targets, first = int(bad_targets.sum()), int(bad_targets.nonzero()[0])
            raise ValueError(f"y holds {num_bad_targets} targets outside {self.likelihood.support(output_shape)} "
                             f"(the first at index {first}: {y[first].tolist()}); check the labels against the "
                             "network's output size")
