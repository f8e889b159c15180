"""The posterior predictive of eq. (1), batched over samples and data."""
import torch

from .layers import run_sampled


class Predictive:
    r"""p(y | x, D) ≈ (1/S) Σ_s p(y | x, θ_s), θ_s ~ q (eq. 1).

    Calling it returns the likelihood's predictive: for ``Categorical`` the mean of the softmax,
    shape ``(N, C)``; for ``Gaussian`` the predictive mean and variance. :meth:`samples` returns
    the per-sample predictions ``(S, N, ...)`` (probabilities or means), e.g. for mutual
    information. Samples are drawn ``chunk_size`` at a time and data processed ``batch_size``
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
        num = self.guide.distinct_draws(self.num_samples)
        draws = self.guide.sample_blocks(num)  # as weights, formed once: every data batch reuses them
        batch_size, chunk = self.pass_shape(x, num)
        training = self.model.training
        self.model.eval()
        try:
            rows = []
            for xb in x.split(batch_size):
                parts = []
                for start in range(0, num, chunk):
                    params = self.guide.layer_params([d[start:start + chunk] for d in draws])
                    parts.append(run_sampled(self.model.net, self.model.layers, params, xb, min(chunk, num - start)))
                rows.append(torch.cat(parts))
        finally:
            self.model.train(training)
        return torch.cat(rows, 1)

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
