"""Per-layer extensions (in the spirit of BackPACK): how a supported module runs with M sampled
weights at once, and which curvature statistics it records on the way.

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

A layer whose weights are shared over T positions per example (a convolution's output
positions, a ``Linear`` applied to a sequence) has two Kronecker factorisations of the per-datum
Fisher (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures"), chosen by the :class:`Recorder`'s ``kfac_approx``:

* ``"expand"`` (KFC, Grosse & Martens 2016; the paper's): A = E_n[(1/T) Σ_t ã_t ã_tᵀ],
  G = E_n[Σ_t g_t g_tᵀ] — d_in² multiply-adds per position;
* ``"reduce"``: A = E_n[ā āᵀ] with ā = (1/T) Σ_t ã_t, G = E_n[ĝ ĝᵀ] with ĝ = Σ_t g_t —
  d_in² per example, T times cheaper.

Both coincide for T = 1 (a ``Linear`` on ``(B, d_in)``).
"""
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


KFAC_APPROXIMATIONS = ("expand", "reduce")


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


class Recorder:
    """Collects the per-block sums of eq. (8) over one sampled forward pass and the backward pass
    that follows: the input side (A, Σ ã ãᵀ) as the forward pass meets each layer, the output side
    (G, Σ g gᵀ, or a diagonal block's Σ of per-example squared gradients) from the gradient w.r.t.
    the layer output, by a hook during the backward pass — the gradient is then freed as in any
    backward pass instead of being returned and held for all layers at once. Hooks record only
    while :attr:`capturing` (a backward pass for other gradients, e.g. the weights' under the MC
    Fisher, sets it to ``False``). K-FAC-reduce factors for weight-shared layers if ``reduce``, else
    K-FAC-expand."""

    def __init__(self, reduce=False):
        self.reduce, self.capturing = reduce, True
        self.recorded, self.input_sums, self.output_sums = set(), {}, {}

    def record(self, name, output, output_sum, input_sum=None):
        """Record block ``name``'s input sum, if any, and ``output_sum``, which maps the gradient w.r.t.
        the layer ``output`` (a fresh tensor or a reshaped view of one) to the block's output-side sum:
        the gradient w.r.t. ``output`` as the layer returned it, even if a later operation modifies it
        in place (e.g. ``ReLU(inplace=True)``). A layer called twice in one pass raises ``ValueError``,
        one run without autograd (``torch.no_grad``, reentrant activation checkpointing) ``RuntimeError``."""
        if not output.requires_grad:
            raise RuntimeError(f"layer '{name}' ran without autograd (inside torch.no_grad() or a reentrant "
                               "torch.utils.checkpoint): its curvature needs the gradient w.r.t. its output")
        if name in self.recorded:
            raise ValueError(f"layer '{name}' ran more than once in one forward pass: eq. (8) takes one input and "
                             "one output per layer and example, so a module whose weights are shared between calls "
                             "is not supported; give each call its own module")
        self.recorded.add(name)
        if input_sum is not None:
            self.input_sums[name] = input_sum
        # the hook goes on the tensor the layer computed: a reshaped view of it (BatchNorm's output, a
        # batched product's) would lose the hook if a later in-place operation rewrote the view
        computed = output if output._base is None else output._base
        computed.register_hook(functools.partial(self._capture, name, output_sum, output.shape))

    def _capture(self, name, output_sum, shape, grad):
        if self.capturing:
            self.output_sums[name] = output_sum(grad.reshape(shape))

    def factors(self, name):
        """The sums of eq. (8) of block ``name``: ``(Σ ã ãᵀ, Σ g gᵀ)`` or ``(Σ per-example gradient²,)``."""
        output_sum = self.output_sums[name]
        return (self.input_sums[name], output_sum) if name in self.input_sums else (output_sum,)


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


def homogeneous_columns(rows, homogeneous):
    """Rows ``(n, d)`` as columns ``(d, n)``, with a last row of ones (ã = [a, 1]) if ``homogeneous``."""
    return (F.pad(rows, (0, 1), value=1.0) if homogeneous else rows).T


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

    def record(self, module, sampled, name, x, out):
        """Record ``out`` and Σ_n of the input factor A (eq. 8) for the layer input ``x``: one product
        of the homogeneous input columns ã = [a, 1] (one allocation of A's size, scaled in place); the
        rows of the first layer are shared by the M samples and counted M times."""
        rows, repeats = sampled.input_statistics(x)
        reduce = sampled.recorder.reduce
        columns, positions = self.input_columns(module, rows, reduce, homogeneous=module.bias is not None)
        outer, scale = columns @ columns.T, repeats if reduce else repeats / positions
        sampled.recorder.record(name, out, functools.partial(self.output_outer, reduce=reduce),
                                input_sum=outer if scale == 1 else outer.mul_(scale))

    @staticmethod
    def output_outer(grad, reduce=False):
        """Σ over examples of Σ_t g_t g_tᵀ, or of ĝ ĝᵀ with ĝ = Σ_t g_t if ``reduce``; ``grad`` of
        shape ``(n, d_out, *positions)``."""
        if reduce:
            g = grad.flatten(2).sum(2).T
        else:
            g = grad.transpose(0, 1).reshape(grad.shape[1], -1)
        return g @ g.T


class LinearAdapter(KroneckerAdapter):
    @staticmethod
    def output_outer(grad, reduce=False):
        """Σ over examples of Σ_t g_t g_tᵀ, or of ĝ ĝᵀ with ĝ = Σ_t g_t if ``reduce``; ``grad`` of
        shape ``(n, *positions, d_out)``."""
        per_example = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        g = per_example.sum(1) if reduce and per_example.shape[1] > 1 else grad.reshape(-1, grad.shape[-1])
        return g.T @ g

    @staticmethod
    def input_columns(module, x, reduce=False, homogeneous=False):
        """The inputs a_t of every example and position as columns ``(d_in, B·T)``, or their means
        over the positions, ``(d_in, B)``, if ``reduce``; with a last row of ones (ã = [a, 1]) if
        ``homogeneous``; and T."""
        per_example = x.reshape(x.shape[0], -1, module.in_features)
        positions = per_example.shape[1]  # with one, expand and reduce coincide
        rows = per_example.mean(1) if reduce and positions > 1 else per_example.reshape(-1, module.in_features)
        return homogeneous_columns(rows, homogeneous), positions

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
        if sampled.recorder is not None:
            self.record(module, sampled, name, x, out)
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


@functools.lru_cache(maxsize=64)
def window_selection(n, kernel, dilation, stride, padding, device, dtype):
    """Along one input dimension of length n (zero-padded by ``padding``), the ``(kernel, n)`` 0/1
    matrix S whose row i marks the entries that kernel offset i covers over all T output positions
    — entry r where r + padding − i·dilation = t·stride for some 0 ≤ t < T — and T. Summing the
    input over the positions of every offset is then a product with S (kept: a layer meets the same
    shapes every step; made outside inference mode, so that a cached S can enter autograd)."""
    positions = (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    with torch.inference_mode(False):
        shift = torch.arange(n, device=device) + padding - dilation * torch.arange(kernel, device=device)[:, None]
        return ((shift >= 0) & (shift % stride == 0) & (shift < positions * stride)).to(dtype), positions


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

    @staticmethod
    def numeric_padding(module):
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
        return module.padding

    def conv(self, module, x, weight, bias, groups=1):
        return F.conv2d(x, weight, bias, module.stride, self.numeric_padding(module), module.dilation, groups)

    def input_windows(self, module, x):
        """The input patch of every output position as a strided view of ``x`` (no copy),
        shape ``(B, C, H', W', kh, kw)``."""
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        ph, pw = self.numeric_padding(module)
        windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        return windows[..., ::dh, ::dw]

    def input_columns(self, module, x, reduce=False, homogeneous=False):
        """The input patches a_t of every example and output position t as columns, shape
        ``(C·kh·kw, B·T)`` (im2col through :meth:`input_windows` and a single copy), or their
        means over the positions, ``(C·kh·kw, B)``, if ``reduce`` (:meth:`mean_patches`); with a last
        row of ones (ã = [a, 1]) if ``homogeneous``; and T. Rows are ordered like ``weight.reshape(out, -1)``."""
        if reduce:
            means, positions = self.mean_patches(module, x)
            return homogeneous_columns(means.reshape(x.shape[0], -1), homogeneous), positions
        patches = self.input_windows(module, x).permute(1, 4, 5, 0, 2, 3)  # (C, kh, kw, B, H', W')
        channels, count = patches.shape[:3].numel(), patches.shape[3:].numel()
        columns = x.new_empty(channels + homogeneous, count)
        columns[:channels].view(patches.shape).copy_(patches)
        columns[channels:] = 1
        return columns, patches.shape[4] * patches.shape[5]

    def mean_patches(self, module, x):
        """The mean input patch ā = (1/T) Σ_t a_t of every example, shape ``(B, C, kh, kw)``, and T:
        ā = S_h x S_wᵀ / T with the selection matrices of :func:`window_selection` for the rows and
        the columns — two matrix products over the input for any stride, dilation and padding
        (faster than the mean of :meth:`input_windows`, ``benchmarks/conv_strategies.py``)."""
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        ph, pw = self.numeric_padding(module)
        rows, row_positions = window_selection(x.shape[2], kh, dh, sh, ph, x.device, x.dtype)
        columns, column_positions = window_selection(x.shape[3], kw, dw, sw, pw, x.device, x.dtype)
        positions = row_positions * column_positions
        return rows @ (x @ columns.T) / positions, positions

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
        if sampled.recorder is not None:
            self.record(module, sampled, name, x, out)
        return out


class BatchNormAdapter(Adapter):
    """``BatchNorm1d/2d``: block vector [γ, β], diagonal curvature from per-example gradients."""

    kind = "diagonal"

    @staticmethod
    def param_names(module):
        return ["weight", "bias"] if module.affine else []

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
        if module.affine:
            out = normalized * params["weight"][:, None, :, None] + params["bias"][:, None, :, None]
        out = out.reshape(x.shape)
        if recorder is not None and module.affine:
            normalized = normalized.detach().reshape(x.shape)
            recorder.record(name, out, lambda grad: self.per_example_gradients(normalized, grad).pow(2).sum(0))
        return out

    @staticmethod
    def per_example_gradients(normalized, grad):
        """Per-example gradients of [γ, β], shape ``(n, 2C)``: Σ_positions g·x̂ and Σ_positions g."""
        n, c = grad.shape[:2]
        g = grad.reshape(n, c, -1)
        return torch.cat([(g * normalized.reshape(n, c, -1)).sum(-1), g.sum(-1)], 1)


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

    Raises :class:`TypeError` naming the first module that owns parameters but is not supported
    (e.g. ``nn.LSTM`` or a bare ``nn.Parameter``), and :class:`ValueError` for a supported module
    in an unsupported configuration.
    """
    layers = {}
    for name, module in net.named_modules():
        adapter = adapter_for(module)
        own_params = [p for p, _ in module.named_parameters(recurse=False)]
        if adapter is None:
            if own_params:
                where = f"'{name}'" if name else "the network itself"
                raise TypeError(
                    f"unsupported layer {where} of type {type(module).__name__} owns parameters "
                    f"{own_params}; supported layers are Linear, Conv2d, BatchNorm1d and BatchNorm2d"
                )
            continue
        adapter.check(name or type(module).__name__, module)
        layers[name] = (module, adapter)
    if not any(adapter.param_names(module) for module, adapter in layers.values()):
        raise ValueError("the network has no Linear, Conv2d or BatchNorm parameters to place a posterior on")
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
