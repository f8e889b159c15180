"""Per-layer extensions (in the spirit of BackPACK): how a supported module runs with M sampled
weights at once, and what it hands the curvature recorder on the way.

The network is run on a *sample-stacked* batch: the input ``x`` of shape ``(B, ...)`` is repeated
to ``(M·B, ...)`` so that rows ``s·B .. (s+1)·B - 1`` belong to weight sample ``s``. Parameter-free
operations (activations, pooling, ``torch.flatten(x, 1)``, residual adds) act per example and
need nothing; every module with parameters has its ``forward`` replaced, for the duration of
:func:`sampled_forward`, by an adapter that applies sample ``s``'s weights to sample ``s``'s rows:

* ``Linear``: a batched matmul ``(M, B, in) @ (M, in, out)``;
* ``Conv2d``: one grouped convolution with ``groups = M``;
* ``BatchNorm1d/2d``: normalisation of each sample's activations over *its own* minibatch.

Each adapter also says how its parameters form one posterior *block*: ``Linear`` and ``Conv2d``
form the matrix W̃ = [W, b] of shape ``(d_out, d_in + 1)`` (bias folded in as a homogeneous
coordinate, Kronecker-factored curvature A ⊗ G); ``BatchNorm`` forms the vector [γ, β]
(diagonal curvature).

The engine hands a Kronecker block to its layer in the eigenbasis of its curvature, as an
:class:`EigenbasisBlock` Z = Q_Gᵀ W̃ Q_A: the layer turns it into weights W̃ = Q_G Z Q_Aᵀ inside
the autograd graph, so that the backward pass returns the gradient in the eigenbasis directly —
or, for a ``Linear`` layer that sees few rows per sample for its size, never forms W̃ at all and
computes x W̃ᵀ = ((x̃ Q_A) Zᵀ) Q_Gᵀ (:meth:`LinearAdapter.runs_in_eigenbasis`).

While the pass runs, a :class:`~pyro_kfacvi.curvature.capture.Recorder` (if given) receives
what each layer meets — inputs and outputs — for the curvature statistics of eq. (8); what it
computes from them lives in :mod:`pyro_kfacvi.curvature`.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EigenbasisBlock:
    """M samples of a Kronecker block in the eigenbasis of its curvature, ``values`` = Z of shape
    ``(M, d_out, d_in)``, with the bases: W̃ = Q_G Z Q_Aᵀ, Q_G = ``basis_out``, Q_A = ``basis_in``."""

    values: torch.Tensor
    basis_out: torch.Tensor
    basis_in: torch.Tensor

    def weights(self):
        """W̃ = Q_G Z Q_Aᵀ for every sample, shaped like ``values``."""
        return self.basis_out @ self.values @ self.basis_in.T

    def without_sample_dim(self):
        """The block of the only sample, Z of shape ``(d_out, d_in)``."""
        return EigenbasisBlock(self.values.squeeze(0), self.basis_out, self.basis_in)


class SampledPass:
    """One forward pass of the network with M weight samples on the sample-stacked input.

    The network input is the same for every weight sample. A layer that receives it unchanged
    (the first layer, usually) runs on its B distinct rows only: one dense convolution or matmul
    with the M samples' weights stacked along the output dimension, instead of M separate ones;
    its input statistics need only one copy of the rows too.
    """

    def __init__(self, num_samples, network_input, recorder=None):
        self.num_samples, self.network_input, self.recorder = num_samples, network_input, recorder

    def distinct_rows(self, x):
        """The B distinct rows of ``x`` if it is the stacked network input, else ``None``."""
        if x is self.network_input and self.num_samples > 1:
            return x[: x.shape[0] // self.num_samples]
        return None

    def input_statistics(self, x):
        """The rows from which to compute a layer's input factor A, and how often each repeats."""
        rows = self.distinct_rows(x)
        return (x.detach(), 1) if rows is None else (rows.detach(), self.num_samples)


class Adapter:
    """Base of the per-layer extensions."""

    @staticmethod
    def check(name, module):
        """Raise ``ValueError`` for a configuration of the module that the adapter cannot run."""


class KroneckerAdapter(Adapter):
    """Shared part of ``Linear`` and ``Conv2d``: the block matrix W̃ = [W | b]."""

    kind = "kronecker"

    @staticmethod
    def param_names(module):
        return ["weight"] + (["bias"] if module.bias is not None else [])

    @staticmethod
    def block_shape(module):
        weight = module.weight
        return (weight.shape[0], weight[0].numel() + (module.bias is not None))

    @staticmethod
    def join(module, params):
        """``{"weight": (..., out, *k), "bias": (..., out)}`` → W̃ of shape ``(..., out, d_in)``."""
        weight = params["weight"]
        batch = weight.shape[: weight.dim() - module.weight.dim()]
        columns = [weight.reshape(*batch, module.weight.shape[0], -1)]
        if module.bias is not None:
            columns.append(params["bias"].unsqueeze(-1))
        return torch.cat(columns, -1)

    @staticmethod
    def split(module, matrix):
        """Inverse of :meth:`join`, for any leading batch shape of ``matrix``."""
        batch = matrix.shape[:-2]
        if module.bias is None:
            return {"weight": matrix.reshape(*batch, *module.weight.shape)}
        # one split (its backward is one concatenation) rather than two slices
        weight, bias = matrix.split([matrix.shape[-1] - 1, 1], -1)
        return {"weight": weight.reshape(*batch, *module.weight.shape), "bias": bias.squeeze(-1)}

    @staticmethod
    def without_sample_dim(params, num_samples):
        """One sample's ``params`` without their sample dimension (M samples' as they are): products
        of plain matrices and layer calls are cheaper than broadcast batched ones."""
        if num_samples != 1:
            return params
        if isinstance(params, EigenbasisBlock):
            return params.without_sample_dim()
        return {name: value.squeeze(0) for name, value in params.items()}

    def weight_params(self, module, params):
        """``params`` as ``{"weight": ..., "bias": ...}``: an :class:`EigenbasisBlock` turned into weights."""
        return self.split(module, params.weights()) if isinstance(params, EigenbasisBlock) else params

    @staticmethod
    def record(sampled, name, module, x, out):
        """Hand the recorder, if any, the layer input ``x`` (its distinct rows) and output ``out``."""
        if sampled.recorder is not None:
            rows, repeats = sampled.input_statistics(x)
            sampled.recorder.record_kronecker(name, module, rows, repeats, out)


class LinearAdapter(KroneckerAdapter):
    @staticmethod
    def runs_in_eigenbasis(module, rows):
        """Whether x W̃ᵀ costs fewer multiply-adds as ((x̃ Q_A) Zᵀ) Q_Gᵀ, rows·(d_in² + d_out²) per
        sample, than forming W̃ = Q_G Z Q_Aᵀ, d_out·d_in·(d_in + d_out) (the backward passes scale alike)."""
        d_out, d_in = module.out_features, module.in_features + (module.bias is not None)
        return rows * (d_in**2 + d_out**2) < d_out * d_in * (d_in + d_out)

    def forward(self, module, x, params, sampled, name):
        num_samples, shared = sampled.num_samples, sampled.distinct_rows(x)
        params, rows = self.without_sample_dim(params, num_samples), x.shape[:-1].numel() // num_samples
        if isinstance(params, EigenbasisBlock) and self.runs_in_eigenbasis(module, rows):
            rotated = self.eigenbasis_inputs(module, x if shared is None else shared, params.basis_in)
            out = self.apply_weights(rotated, x.shape[:-1], params.values, None, num_samples, shared is not None)
            out = out @ params.basis_out.T
        else:
            params = self.weight_params(module, params)
            out = self.apply_weights(x if shared is None else shared, x.shape[:-1], params["weight"],
                                     params.get("bias"), num_samples, shared is not None)
        self.record(sampled, name, module, x, out)
        return out

    @staticmethod
    def eigenbasis_inputs(module, x, basis_in):
        """x̃ Q_A for the inputs x̃ = [x, 1] of any leading shape: the homogeneous coordinate adds Q_A's
        last row, as the bias of one ``F.linear``."""
        if module.bias is None:
            return x @ basis_in
        return F.linear(x, basis_in[:-1].T, basis_in[-1])

    @staticmethod
    def apply_weights(x, lead, weight, bias, num_samples, shared):
        """Sample s's weights ``(M, out, in)`` on sample s's rows of ``x`` — or, if ``shared``, all
        M on the same rows — returned sample-stacked with leading shape ``lead``; one sample's
        weights come without the sample dimension."""
        if num_samples == 1:
            return F.linear(x, weight, bias)
        if shared:  # one matmul with the M weight matrices stacked: (B, M·out)
            out = F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
            return out.unflatten(-1, (num_samples, -1)).movedim(-2, 0).reshape(*lead, -1)
        xs, wt = x.reshape(num_samples, -1, x.shape[-1]), weight.transpose(1, 2)
        out = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)
        return out.reshape(*lead, -1)


def conv_padding(module):
    """A ``Conv2d``'s padding as two numbers (``"valid"`` and ``"same"`` resolved)."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return module.padding


class Conv2dAdapter(KroneckerAdapter):
    grouped = None  # None: grouped convolution on CUDA, one convolution per sample on CPU

    @staticmethod
    def check(name, module):
        if module.groups != 1:
            raise ValueError(f"layer '{name}': Conv2d with groups={module.groups} is not supported (groups must be 1)")
        if module.padding_mode != "zeros":
            raise ValueError(f"layer '{name}': Conv2d padding_mode='{module.padding_mode}' is not supported, use 'zeros'")
        if isinstance(module.padding, str) and module.padding == "same":
            if any(d * (k - 1) % 2 for k, d in zip(module.kernel_size, module.dilation)):
                raise ValueError(f"layer '{name}': padding='same' with an even effective kernel is not supported")

    def conv(self, module, x, weight, bias, groups=1):
        return F.conv2d(x, weight, bias, module.stride, conv_padding(module), module.dilation, groups)

    def sampled_conv(self, module, x, weight, bias, num_samples):
        """Sample s's weights on sample s's rows: one grouped convolution on CUDA; on CPU, where
        grouped convolutions are slower than separate ones (benchmarks/step_cost.py), one per sample."""
        if self.grouped if self.grouped is not None else x.is_cuda:
            stacked = x.unflatten(0, (num_samples, -1)).transpose(0, 1).flatten(1, 2)
            out = self.conv(module, stacked, weight.flatten(0, 1), None if bias is None else bias.flatten(), num_samples)
            return out.unflatten(1, (num_samples, -1)).transpose(0, 1).flatten(0, 1)
        biases = [None] * num_samples if bias is None else bias
        return torch.cat([self.conv(module, rows, w, b) for rows, w, b in zip(x.chunk(num_samples), weight, biases)])

    def forward(self, module, x, params, sampled, name):
        num_samples, shared = sampled.num_samples, sampled.distinct_rows(x)
        params = self.weight_params(module, self.without_sample_dim(params, num_samples))
        weight, bias = params["weight"], params.get("bias")
        if num_samples == 1:
            out = self.conv(module, x, weight, bias)
        elif shared is not None:  # one convolution with the M filter banks stacked: (B, M·out, H, W)
            out = self.conv(module, shared, weight.flatten(0, 1), None if bias is None else bias.flatten())
            out = out.unflatten(1, (num_samples, -1)).transpose(0, 1).flatten(0, 1)
        else:
            out = self.sampled_conv(module, x, weight, bias, num_samples)
        self.record(sampled, name, module, x, out)
        return out


class BatchNormAdapter(Adapter):
    """``BatchNorm1d/2d``: block vector [γ, β], diagonal curvature from per-example gradients."""

    kind = "diagonal"

    @staticmethod
    def param_names(module):
        """[γ, β] if they are trainable; a frozen or affine-free BatchNorm has no block."""
        return ["weight", "bias"] if module.affine and module.weight.requires_grad else []

    @staticmethod
    def block_shape(module):
        return (2 * module.num_features,)

    @staticmethod
    def join(module, params):
        return torch.cat([params["weight"], params["bias"]], -1)

    @staticmethod
    def split(module, vector):
        weight, bias = vector.split(module.num_features, -1)
        return {"weight": weight, "bias": bias}

    @staticmethod
    def batch_statistics(module, xs):
        """Per-sample mean and biased variance over the minibatch, ``xs`` of shape (M, B, C, L)."""
        var, mean = torch.var_mean(xs, dim=(1, 3), unbiased=False)
        if module.training and module.track_running_stats:
            BatchNormAdapter.update_running_stats(module, mean, var, xs.shape[1] * xs.shape[3])
        return mean, var

    @staticmethod
    @torch.no_grad()
    def update_running_stats(module, mean, var, count):
        """Running statistics follow the average over the M samples of each sample's batch statistics."""
        module.num_batches_tracked += 1
        momentum = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        unbiased = var.mean(0) * count / max(count - 1, 1)
        module.running_mean.lerp_(mean.mean(0), momentum)
        module.running_var.lerp_(unbiased, momentum)

    def forward(self, module, x, params, sampled, name):
        num_samples, recorder = sampled.num_samples, sampled.recorder
        xs = x.reshape(num_samples, -1, module.num_features, x[0, 0].numel())
        if module.training or not module.track_running_stats:
            mean, var = self.batch_statistics(module, xs)
        else:
            mean, var = module.running_mean.expand(num_samples, -1), module.running_var.expand(num_samples, -1)
        normalized = (xs - mean[:, None, :, None]) * torch.rsqrt(var[:, None, :, None] + module.eps)
        out = normalized
        if module.affine:  # sampled [γ, β], or a frozen module's own
            weight, bias = (params["weight"], params["bias"]) if params else (module.weight.expand(num_samples, -1),
                                                                              module.bias.expand(num_samples, -1))
            out = normalized * weight[:, None, :, None] + bias[:, None, :, None]
        out = out.reshape(x.shape)
        if recorder is not None and params:
            recorder.record_diagonal(name, normalized.reshape(x.shape), out)
        return out


ADAPTERS = (
    (nn.Linear, LinearAdapter()),
    (nn.Conv2d, Conv2dAdapter()),
    ((nn.BatchNorm1d, nn.BatchNorm2d), BatchNormAdapter()),
)


def adapter_for(module):
    for types, adapter in ADAPTERS:
        if isinstance(module, types):
            return adapter
    return None


def find_layers(net):
    """All modules of ``net`` that need an adapter, as ``{name: (module, adapter)}``.

    A module whose parameters all have ``requires_grad=False`` is *frozen*: a frozen ``Linear`` or
    ``Conv2d`` — or a frozen module of any other type — runs as it is, its weights shared by the M
    samples, and gets no posterior; a frozen ``BatchNorm`` keeps its adapter (each sample normalises
    over its own minibatch) with its own fixed scale and shift.

    Raises :class:`TypeError` naming the first module that owns trainable parameters but is not
    supported (e.g. ``nn.LSTM`` or a bare ``nn.Parameter``), and :class:`ValueError` for a supported
    module in an unsupported configuration or with some parameters frozen and others not.
    """
    layers = {}
    for name, module in net.named_modules():
        where = f"'{name}'" if name else "the network itself"
        own = dict(module.named_parameters(recurse=False))
        trainable = [p for p, value in own.items() if value.requires_grad]
        if trainable and len(trainable) < len(own):
            raise ValueError(f"layer {where} has frozen and trainable parameters ({sorted(own)}, trainable "
                             f"{trainable}): freeze all of a layer's parameters or none")
        adapter = adapter_for(module)
        if adapter is None:
            if trainable:
                raise TypeError(
                    f"unsupported layer {where} of type {type(module).__name__} owns parameters {trainable}; "
                    "supported layers are Linear, Conv2d, BatchNorm1d and BatchNorm2d (a layer of another type "
                    "can stay in the network with requires_grad=False)")
            continue
        if own and not trainable and adapter.kind == "kronecker":
            continue
        adapter.check(name or type(module).__name__, module)
        layers[name] = (module, adapter)
    if not any(adapter.param_names(module) for module, adapter in layers.values()):
        raise ValueError("the network has no trainable Linear, Conv2d or BatchNorm parameters to place a posterior on")
    return layers


@contextlib.contextmanager
def sampled_forward(layers, params, sampled):
    """Within this context, every layer in ``layers`` runs with its M sampled parameters.

    ``params`` maps each layer name to ``{"weight": (M, ...), "bias": (M, ...)}`` or, for a
    ``Linear`` or ``Conv2d`` layer, to an :class:`EigenbasisBlock`; ``sampled``
    is the :class:`SampledPass`.
    """
    try:
        for name, (module, adapter) in layers.items():
            module.forward = _bind(adapter, module, params.get(name, {}), sampled, name)
        yield
    finally:
        for module, _ in layers.values():
            module.__dict__.pop("forward", None)


def _bind(adapter, module, params, sampled, name):
    def forward(x):
        return adapter.forward(module, x, params, sampled, name)
    return forward


def stack_samples(x, num_samples):
    """``(B, ...)`` → ``(M·B, ...)``: the input repeated once per weight sample."""
    if num_samples == 1:
        return x
    return x.unsqueeze(0).expand(num_samples, *x.shape).reshape(-1, *x.shape[1:])


def run_sampled(net, layers, params, x, num_samples, recorder=None):
    """Network output for each of the M weight samples, shape ``(M, B, ...)``."""
    stacked = stack_samples(x, num_samples)
    with sampled_forward(layers, params, SampledPass(num_samples, stacked, recorder)):
        out = net(stacked)
    return out.reshape(num_samples, x.shape[0], *out.shape[1:])
