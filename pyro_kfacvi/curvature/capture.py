r"""Capture of the per-block sums of eq. (8) during one sampled forward and backward pass.

The layer adapters (:mod:`pyro_kfacvi.layers`) hand the :class:`Recorder` what they meet — a
Kronecker layer's input rows and output, BatchNorm's normalised activations and output — and
the recorder turns them into sums over examples (and weight samples):

* the input side of a ``Linear`` or ``Conv2d`` block, Σ ã ãᵀ with ã = [a, 1], as the forward
  pass meets the layer;
* the output side, Σ g gᵀ (or a BatchNorm block's Σ of per-example squared gradients of [γ, β]),
  from the gradient w.r.t. the layer output, by a hook during the backward pass — the gradient
  is then freed as in any backward pass instead of being held for all layers at once.

A layer whose weights are shared over T positions per example (a convolution's output
positions, a ``Linear`` applied to a sequence) has two Kronecker factorisations of the per-datum
Fisher (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures"), chosen by ``kfac_approx``:

* ``"expand"`` (KFC, Grosse & Martens 2016; the paper's): A = E_n[(1/T) Σ_t ã_t ã_tᵀ],
  G = E_n[Σ_t g_t g_tᵀ] — d_in² multiply-adds per position;
* ``"reduce"``: A = E_n[ā āᵀ] with ā = (1/T) Σ_t ã_t, G = E_n[ĝ ĝᵀ] with ĝ = Σ_t g_t —
  d_in² per example, T times cheaper.

Both coincide for T = 1 (a ``Linear`` on ``(B, d_in)``).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv_padding

KFAC_APPROXIMATIONS = ("expand", "reduce")


def homogeneous_columns(rows, homogeneous):
    """Rows ``(n, d)`` as columns ``(d, n)``, with a last row of ones (ã = [a, 1]) if ``homogeneous``."""
    return (F.pad(rows, (0, 1), value=1.0) if homogeneous else rows).T


class LinearStatistics:
    """The K-FAC statistics of a ``Linear`` layer on inputs ``(n, *positions, d_in)``."""

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
    def output_outer(grad, reduce=False):
        """Σ over examples of Σ_t g_t g_tᵀ, or of ĝ ĝᵀ with ĝ = Σ_t g_t if ``reduce``; ``grad`` of
        shape ``(n, *positions, d_out)``."""
        per_example = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        g = per_example.sum(1) if reduce and per_example.shape[1] > 1 else grad.reshape(-1, grad.shape[-1])
        return g.T @ g


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


class Conv2dStatistics:
    """The K-FAC statistics of a ``Conv2d`` layer: its input patches and output positions."""

    @staticmethod
    def input_windows(module, x):
        """The input patch of every output position as a strided view of ``x`` (no copy),
        shape ``(B, C, H', W', kh, kw)``."""
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        ph, pw = conv_padding(module)
        windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        return windows[..., ::dh, ::dw]

    @classmethod
    def input_columns(cls, module, x, reduce=False, homogeneous=False):
        """The input patches a_t of every example and output position t as columns, shape
        ``(C·kh·kw, B·T)`` (im2col through :meth:`input_windows` and a single copy), or their
        means over the positions, ``(C·kh·kw, B)``, if ``reduce`` (:meth:`mean_patches`); with a last
        row of ones (ã = [a, 1]) if ``homogeneous``; and T. Rows are ordered like ``weight.reshape(out, -1)``."""
        if reduce:
            means, positions = cls.mean_patches(module, x)
            return homogeneous_columns(means.reshape(x.shape[0], -1), homogeneous), positions
        patches = cls.input_windows(module, x).permute(1, 4, 5, 0, 2, 3)  # (C, kh, kw, B, H', W')
        channels, count = patches.shape[:3].numel(), patches.shape[3:].numel()
        columns = x.new_empty(channels + homogeneous, count)
        columns[:channels].view(patches.shape).copy_(patches)
        columns[channels:] = 1
        return columns, patches.shape[4] * patches.shape[5]

    @staticmethod
    def mean_patches(module, x):
        """The mean input patch ā = (1/T) Σ_t a_t of every example, shape ``(B, C, kh, kw)``, and T:
        ā = S_h x S_wᵀ / T with the selection matrices of :func:`window_selection` for the rows and
        the columns — two matrix products over the input for any stride, dilation and padding
        (faster than the mean of :meth:`input_windows`, ``benchmarks/conv_strategies.py``)."""
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        ph, pw = conv_padding(module)
        rows, row_positions = window_selection(x.shape[2], kh, dh, sh, ph, x.device, x.dtype)
        columns, column_positions = window_selection(x.shape[3], kw, dw, sw, pw, x.device, x.dtype)
        positions = row_positions * column_positions
        return rows @ (x @ columns.T) / positions, positions

    @staticmethod
    def output_outer(grad, reduce=False):
        """Σ over examples of Σ_t g_t g_tᵀ, or of ĝ ĝᵀ with ĝ = Σ_t g_t if ``reduce``; ``grad`` of
        shape ``(n, d_out, *positions)``."""
        if reduce:
            g = grad.flatten(2).sum(2).T
        else:
            g = grad.transpose(0, 1).reshape(grad.shape[1], -1)
        return g @ g.T


def batchnorm_per_example_gradients(normalized, grad):
    """Per-example gradients of BatchNorm's [γ, β], shape ``(n, 2C)``: Σ_positions g·x̂ and Σ_positions g."""
    n, c = grad.shape[:2]
    g = grad.reshape(n, c, -1)
    return torch.cat([(g * normalized.reshape(n, c, -1)).sum(-1), g.sum(-1)], 1)


KRONECKER_STATISTICS = {nn.Linear: LinearStatistics, nn.Conv2d: Conv2dStatistics}


def kronecker_statistics(module):
    """The statistics class of a ``Linear`` or ``Conv2d`` module (subclasses included)."""
    return next(stats for kind, stats in KRONECKER_STATISTICS.items() if isinstance(module, kind))


class Recorder:
    """Collects the per-block sums of eq. (8) over one sampled forward pass and the backward pass
    that follows. Hooks record only while :attr:`capturing` (a backward pass for other gradients,
    e.g. the weights' under the MC Fisher, sets it to ``False``).

    :param str kfac_approx: ``"expand"`` or ``"reduce"`` (module doc).
    """

    def __init__(self, kfac_approx="expand"):
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        self.reduce, self.capturing = kfac_approx == "reduce", True
        self.recorded, self.input_sums, self.output_sums = set(), {}, {}

    def record_kronecker(self, name, module, rows, repeats, output):
        """A ``Linear`` or ``Conv2d`` block: Σ_n of the input factor A (eq. 8) from the layer input
        ``rows``, each counted ``repeats`` times (the first layer's rows are shared by the M samples),
        as one product of the homogeneous input columns ã = [a, 1] (one allocation of A's size, scaled
        in place); and the hook that takes Σ g gᵀ from the gradient w.r.t. ``output``."""
        stats = kronecker_statistics(module)
        columns, positions = stats.input_columns(module, rows, self.reduce, homogeneous=module.bias is not None)
        outer, scale = columns @ columns.T, repeats if self.reduce else repeats / positions
        self._record(name, output, functools.partial(stats.output_outer, reduce=self.reduce),
                     input_sum=outer if scale == 1 else outer.mul_(scale))

    def record_diagonal(self, name, normalized, output):
        """A BatchNorm block [γ, β] with normalised activations ``normalized`` (shaped like ``output``):
        the hook that takes Σ_n of the per-example squared gradients."""
        normalized = normalized.detach()
        self._record(name, output, lambda grad: batchnorm_per_example_gradients(normalized, grad).pow(2).sum(0))

    def _record(self, name, output, output_sum, input_sum=None):
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
