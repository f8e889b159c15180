"""The posterior predictive of eq. (1), batched over samples and data."""
import torch
from pyro import poutine

from .guides import KroneckerGuide
from .layers import run_sampled


class Predictive:
    r"""p(y | x, D) ≈ (1/S) Σ_s p(y | x, θ_s), θ_s ~ q (eq. 1).

    Calling it returns the likelihood's predictive: for ``Categorical`` the mean of the softmax,
    shape ``(N, C)``; for ``Gaussian`` a :class:`~pyro_kfacvi.likelihoods.GaussianPrediction`
    ``(mean, variance, epistemic, aleatoric)``, each ``(N, D)``, variance = epistemic + aleatoric
    (Var_s f + σ²). :meth:`samples` returns the per-sample predictions ``(S, N, ...)``
    (probabilities or means), e.g. for mutual information. ``x`` is checked as
    :meth:`KFACVI.step <pyro_kfacvi.KFACVI.step>` checks it (shape, dtype, NaN and Inf).

    The guide is a Kronecker guide, whose blocks are drawn directly, or any Pyro guide that draws
    the model's weight sites when called as ``guide(x)`` — e.g. ``pyro.infer.autoguide.AutoNormal``
    fitted by ``pyro.infer.SVI``: its S draws are S traces of that call. Samples are drawn ``chunk_size`` at a time and data processed ``batch_size``
    rows at a time, so memory stays bounded. By default one pass holds about 400 images on the
    CPU, with as many samples as possible (up to 64; 8 rows × 50 samples for S = 50): the
    activations stay in cache, and glibc keeps reusing their memory — passes of 128 rows × 8
    samples made it hand freed memory back to the system and fault it in again, 628,000 page
    faults per 1,000 images, and ran at 0.75× a loop over samples against 1.25–1.32× now
    (``benchmarks/step_cost.py --predictive-pass``; docs/performance.md). On CUDA one pass holds
    8,192 images (1,000 rows). The network runs in eval mode (BatchNorm uses its running
    statistics), its mode is restored afterwards. The same S posterior samples are used for every
    data batch.

    Equivalent to averaging ``softmax(output)`` over the samples of
    ``pyro.infer.Predictive(model, guide=guide, num_samples=S)`` (tested).
    """

    def __init__(self, model, guide, num_samples, chunk_size=None, batch_size=None):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        self.model, self.guide = model, guide
        self.num_samples, self.batch_size, self.chunk_size = int(num_samples), batch_size, chunk_size

    @torch.no_grad()
    def outputs(self, x):
        """Raw network outputs for S posterior samples, shape ``(S, N, ...)``."""
        self.model.check_batch(x)
        self.model.check_values(x)
        num, layer_params = self.draws(x)  # formed once: every data batch reuses them
        batch_size, chunk = self.pass_shape(x, num)
        training = self.model.training
        self.model.eval()
        try:
            rows = []
            for xb in x.split(batch_size):
                parts = []
                for start in range(0, num, chunk):
                    params = layer_params(slice(start, start + chunk))
                    parts.append(run_sampled(self.model.net, self.model.layers, params, xb, min(chunk, num - start)))
                rows.append(torch.cat(parts))
        finally:
            self.model.train(training)
        return torch.cat(rows, 1)

    def draws(self, x):
        """The posterior draws as weights: ``(their number, part ↦ {layer: {parameter: (n, *shape)}})``
        for a slice ``part`` of them — one draw for a point mass."""
        if isinstance(self.guide, KroneckerGuide):
            num = self.guide.distinct_draws(self.num_samples)
            blocks = self.guide.sample_blocks(num)
            return num, lambda part: self.guide.layer_params([block[part] for block in blocks])
        weights = self.site_draws(x)
        return self.num_samples, lambda part: self.model.layer_params({n: w[part] for n, w in weights.items()})

    def site_draws(self, x):
        """``{weight site: (S, *shape)}`` from S traces of a Pyro guide called as ``guide(x)``."""
        traces = [poutine.trace(self.guide).get_trace(x) for _ in range(self.num_samples)]
        sites = self.model.weight_sites()
        missing = [name for name in sites if name not in traces[0].nodes]
        if missing:
            raise TypeError(f"the guide {type(self.guide).__name__} draws no value for the model's weight sites "
                            f"{missing}: Predictive needs a Kronecker guide or a Pyro guide over the model's weight "
                            "sites (e.g. pyro.infer.autoguide.AutoNormal(model), fitted)")
        weights = {name: torch.stack([trace.nodes[name]["value"] for trace in traces]) for name in sites}
        wrong = {name: tuple(w.shape[1:]) for name, w in weights.items() if w.shape[1:] != sites[name][2].shape}
        if wrong:
            raise ValueError(f"the guide {type(self.guide).__name__} draws weight sites of other shapes than the "
                             f"model's parameters: {wrong}")
        return weights

    def pass_shape(self, x, num_samples):
        """(data rows, samples) of one batched pass: the ones given, else the defaults above."""
        if x.is_cuda:
            rows = self.batch_size or 1000
            return rows, self.chunk_size or max(1, 8192 // min(rows, x.shape[0]))
        samples = self.chunk_size or min(num_samples, 64)
        return self.batch_size or max(1, 400 // samples), samples

    def samples(self, x):
        """Per-sample predictions ``(S, N, ...)``: class probabilities or regression means."""
        return self.model.likelihood.predict(self.outputs(x))

    def __call__(self, x):
        return self.model.likelihood.predictive(self.outputs(x))
