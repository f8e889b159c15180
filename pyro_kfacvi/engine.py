"""The natural-gradient engine: Noisy K-FAC / KFAC-VI with M weight samples per step."""
import math
import warnings
from dataclasses import dataclass

import torch

from .layers import KFAC_APPROXIMATIONS, Recorder, run_sampled
from .model import all_finite

WEIGHT_DECAY_MODES = ("coupled", "decoupled", "literal")
NONFINITE_POLICIES = ("raise", "retry")


@dataclass
class Statistics:
    """What one minibatch contributes: the mean negative log-likelihood per datum, ḡ per block
    (eq. 7) and, when curvature is refreshed, F̄ per block (eq. 8: ``(A, G)`` or ``(diag,)``)."""

    nll: torch.Tensor
    grads: list
    factors: list = None


def flatten(factors):
    """The tensors of per-block factor tuples, as one list."""
    return [f for fs in factors for f in fs]


def sum_over_samples(grad):
    """Σ over the leading sample dimension of ``grad`` (a view when there is one sample)."""
    return grad[0] if grad.shape[0] == 1 else grad.sum(0)


class KFACVI:
    r"""SVI-style natural-gradient variational inference with a :class:`~pyro_kfacvi.KroneckerGuide`.

    Each :meth:`step` draws M = ``num_particles`` weight samples θ_s ~ q, runs the network for all
    of them at once (batched over samples, in chunks of ``chunk_size`` samples) and updates the
    guide in place (equation numbers of DEVELOPERS.md):

    * (7)  ḡ = −(1/MB) Σ_s Σ_n ∇_θ log p(y_n | x_n, θ_s)
    * (8)  F̄ = (1/MB) Σ_s Σ_n of the same per-example outer products, as A ⊗ G
      (``fisher="empirical"``: observed labels; ``fisher="mc"``: labels drawn from the model;
      ``kfac_approx``: how layers with shared weights, e.g. convolutions, factorise it)
    * (9)  F̂ ← (1 − β) F̂ + β F̄
    * (10) v ← (F̂ + γI)⁻¹ (ḡ + π μ) + decay + m_t v
    * (11) μ ← μ − α_t v
    * (12) Σ = ρ² (F̂ + γI)⁻¹ (held by the guide)

    All of it happens in the eigenbasis of each block's F̂ (Z = Q_Gᵀ W̃ Q_A for a Kronecker block),
    where (F̂ + γI)⁻¹ and Σ are diagonal: the samples are drawn there elementwise, the layers
    return ḡ there (:mod:`pyro_kfacvi.layers`), eq. (10) divides by the damped eigenvalues, and μ
    and v stay there, re-expressed whenever the eigenbases are recomputed.

    π = kl_weight/(Nη) is the prior precision per datum in the guide's ELBO-exact mode (0
    otherwise). γ is the guide's posterior damping. The weight decay λ enters as
    ``weight_decay_mode``:

    * ``"coupled"``: (F̂ + γI)⁻¹ (ḡ + π μ + λ μ) — an L2 penalty inside the preconditioner;
    * ``"decoupled"``: + λ μ after preconditioning — μ shrinks by α_t λ per step, fading with α_t;
    * ``"literal"``: + (λ / α_t) μ, eq. (10) as printed — μ shrinks by λ per step whatever α_t.

    :param model: :class:`~pyro_kfacvi.BayesianModel`.
    :param guide: :class:`~pyro_kfacvi.KroneckerGuide` of that model.
    :param lr: α, a float or a schedule ``t ↦ α_t`` (e.g. :class:`~pyro_kfacvi.WarmupPolynomialLR`,
        whose ``momentum_scale`` also sets m_t, eq. 6).
    :param float momentum: m (m_base under a schedule).
    :param float weight_decay: λ.
    :param float beta: β of eq. (9).
    :param float damping: γ; if given, sets ``guide.damping``.
    :param int num_particles: M.
    :param str fisher: ``"empirical"`` or ``"mc"``.
    :param str kfac_approx: ``"expand"`` (KFC, the paper's) or ``"reduce"`` (T times cheaper for a
        layer shared over T positions; :mod:`pyro_kfacvi.layers`).
    :param int curvature_every: refresh F̄ every k steps (default 1).
    :param int inverse_every: recompute eigenbases every k' steps (default 10).
    :param int chunk_size: samples per batched forward pass; default ``max(1, 1024 // B)``.
    :param str on_nonfinite: what a step whose loss, gradients or curvature are not finite does:
        ``"raise"`` a ``FloatingPointError``, or ``"retry"`` it with fresh samples and the damping
        multiplied by ``damping_growth`` (at most ``max_retries`` times; the larger γ is kept, and
        if every retry fails γ is restored and ``FloatingPointError`` raised). A rejected attempt
        changes nothing: μ, F̂, the eigenbases, the momentum and the network's buffers stay as
        they were.
    :param int max_retries: retries of one step under ``on_nonfinite="retry"``.
    :param float damping_growth: factor (> 1) applied to γ at each retry.
    :param parallel: a :class:`~pyro_kfacvi.distributed.ParallelPlan` to share each step with other
        processes: this rank's samples come from its sample stream, and eqs. (7, 8) are summed over
        all ranks before the update, so every :meth:`step` is a collective call (``None``: one process).
    """

    def __init__(self, model, guide, lr, momentum=0.0, weight_decay=0.0, beta=0.05, damping=None,
                 num_particles=1, fisher="empirical", kfac_approx="expand", weight_decay_mode="decoupled",
                 curvature_every=1, inverse_every=10, chunk_size=None, on_nonfinite="raise", max_retries=3,
                 damping_growth=10.0, parallel=None):
        if guide.model is not model:
            raise ValueError("the guide was built for a different model")
        if not callable(lr) and not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number or a schedule, got {lr}")
        checks = {"momentum": 0 <= momentum < 1, "weight_decay": weight_decay >= 0, "beta": 0 < beta <= 1,
                  "num_particles": int(num_particles) == num_particles and num_particles >= 1,
                  "curvature_every": curvature_every >= 1, "inverse_every": inverse_every >= 1,
                  "chunk_size": chunk_size is None or chunk_size >= 1,
                  "max_retries": int(max_retries) == max_retries and max_retries >= 0,
                  "damping_growth": damping_growth > 1 and math.isfinite(damping_growth)}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={locals()[name]}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        if guide.is_point_mass and num_particles > 1:
            raise ValueError("num_particles > 1 with rho=0 draws M identical samples; use num_particles=1")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if damping is not None:
            guide.damping = damping
        if guide.posterior_damping == 0:
            raise ValueError("damping=0 leaves F̂ + γI singular wherever F̂ is (dead units, unused inputs) and "
                             "a retry cannot grow it; use damping > 0 (e.g. 1e-3)")
        self.model, self.guide = model, guide
        self.lr, self.momentum, self.weight_decay = lr, float(momentum), float(weight_decay)
        self.beta, self.num_particles, self.fisher, self.kfac_approx = float(beta), int(num_particles), fisher, kfac_approx
        self.weight_decay_mode = weight_decay_mode
        self.curvature_every, self.inverse_every, self.chunk_size = curvature_every, inverse_every, chunk_size
        self.on_nonfinite, self.max_retries, self.damping_growth = on_nonfinite, int(max_retries), float(damping_growth)
        self.parallel = parallel
        self.iteration = 0
        self.last_complexity = None  # the complexity term of the loss the last step returned
        self.velocities = [torch.zeros_like(block.eigenbasis_loc) for block in guide.blocks]  # eigenbasis coordinates

    # ----------------------------------------------------------------------------------------
    def hyperparameters(self, t):
        """α_t and m_t at iteration t (eqs. 6, 13, 14 under a schedule)."""
        if callable(self.lr):
            scale = getattr(self.lr, "momentum_scale", lambda _: 1.0)(t)
            return self.lr(t), self.momentum * scale
        return self.lr, self.momentum

    def sample_blocks(self):
        """The step's M weight samples in eigenbasis coordinates: from the global RNG, or from this
        rank's sample stream under ``parallel`` (keyed by the iteration, so a retried step reuses its noise)."""
        if self.parallel is None:
            return self.guide.sample_eigenbasis_blocks(self.num_particles)
        return self.parallel.sample_blocks(self.guide, self.num_particles, self.iteration)

    def step(self, x, y):
        """One update on the minibatch ``(x, y)``; returns the negative ELBO per datum estimated
        before the update (for ρ = 0: the negative log joint per datum).

        Bad input (shapes, dtypes, NaN/Inf in ``x``, labels outside the classes) raises before any
        work; non-finite statistics are handled as ``on_nonfinite`` says. A model in eval mode is put
        in training mode (submodules that were switched to eval mode on their own stay so).
        :attr:`last_complexity` then holds the loss's complexity term (:meth:`complexity` before the
        update, a tensor), for a training loop that reports it apart without computing it again."""
        self.model.check_batch(x, y)
        self.model.check_values(x, y)
        if not self.model.training:
            self.model.train()
        with_curvature = self.iteration % self.curvature_every == 0
        stats, loss = self.finite_statistics(x, y, with_curvature)
        self.apply(stats)
        return loss

    def apply(self, stats):
        """The rest of a step, given its finite statistics: eq. (9) when they hold curvature, the
        eigenbases every ``inverse_every`` steps, eqs. (10, 11); advances the iteration."""
        t = self.iteration
        device = self.guide.blocks[0].eigenbasis_loc.device
        if self.velocities[0].device != device:  # the guide was moved after the engine was built
            self.velocities = [v.to(device) for v in self.velocities]
        if stats.factors is not None:
            for block, factors in zip(self.guide.blocks, stats.factors):
                block.curvature.update(factors, self.beta)  # (9)
        if t % self.inverse_every == 0:  # ḡ, drawn in the old eigenbases, moves along with μ and v
            for block, velocity, grad in zip(self.guide.blocks, self.velocities, stats.grads):
                block.refresh(carried=(velocity, grad))
        self.update(stats.grads, *self.hyperparameters(t))
        self.iteration += 1

    def finite_statistics(self, x, y, with_curvature):
        """Eqs. (7, 8) and the loss (a number) for fresh weight samples, checked by :meth:`checked_loss`
        and, under ``on_nonfinite="retry"``, redrawn with a larger damping until finite. The forward
        pass moves BatchNorm's running statistics: a rejected attempt restores the network's buffers."""
        damping, buffers = self.guide.damping, [b.clone() for b in self.model.buffers()]
        attempts = 1 + (self.max_retries if self.on_nonfinite == "retry" else 0)
        for attempt in range(1, attempts + 1):
            stats = self.statistics(x, y, self.sample_blocks(), with_curvature)
            complexity = self.complexity()
            try:
                loss = self.checked_loss(self.iteration, stats.nll + complexity, stats)
                self.last_complexity = complexity
                return stats, loss
            except FloatingPointError as fault:
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
                if attempt == attempts:
                    self.guide.damping = damping
                    if attempts == 1:
                        raise
                    raise FloatingPointError(f"{fault} {attempts - 1} retries with the damping grown up to "
                                             f"{damping * self.damping_growth ** (attempts - 1):.3g} failed too; "
                                             f"the damping is back at {damping:.3g}.") from fault
                self.guide.damping *= self.damping_growth
                warnings.warn(f"{fault} Retrying ({attempt} of {attempts - 1}) with damping "
                              f"{self.guide.damping:.3g}.", RuntimeWarning, stacklevel=3)

    @staticmethod
    def checked_loss(t, loss, stats):
        """``loss`` as a number, once it, the gradients and the curvature are found finite — one host
        synchronisation for both; a step that is not raises ``FloatingPointError`` before any state changes."""
        tensors = [*stats.grads, *flatten(stats.factors or [])]
        loss, *norms = torch.stack([loss, *torch._foreach_norm(tensors)]).tolist()
        if not (math.isfinite(loss) and all_finite(tensors, norms)):
            raise FloatingPointError(
                f"non-finite loss, gradient or curvature at iteration {t} (loss {loss:.4g}); the guide "
                "was left unchanged. Typical causes: a learning rate too large for the damping (increase damping, "
                "use split_damping=True or on_nonfinite='retry'), or a diverged run.")
        return loss

    @torch.no_grad()
    def evaluate_loss(self, x, y):
        """The negative ELBO per datum on ``(x, y)`` with M fresh samples, without updating the guide.
        The network runs in its current mode (in training mode BatchNorm's running statistics move)."""
        self.model.check_batch(x, y)
        with torch.enable_grad():
            stats = self.statistics(x, y, self.sample_blocks(), with_curvature=False)
        return (stats.nll + self.complexity()).item()

    def complexity(self):
        """kl_weight·KL(q‖p)/N, or −log p(μ)/N for a point mass."""
        guide, n = self.guide, self.model.num_data
        if guide.is_point_mass:
            return -guide.log_prior_of_mean() / n
        return guide.kl_to_prior() * (guide.kl_weight / n)

    # ----------------------------------------------------------------------------------------
    def statistics(self, x, y, block_samples, with_curvature=True):
        """Eqs. (7, 8) for the given block samples ``(M, *block_shape)`` in eigenbasis coordinates
        (:meth:`KroneckerGuide.sample_eigenbasis_blocks`), processed in chunks; ḡ comes in the
        same coordinates, F̄ in the weights'."""
        num_samples, batch = block_samples[0].shape[0], x.shape[0]
        chunk = self.chunk_size or max(1, 1024 // batch)
        grads, factors, nll = None, None, 0.0
        for start in range(0, num_samples, chunk):
            part = block_samples if chunk >= num_samples else [s[start:start + chunk] for s in block_samples]
            chunk_nll, chunk_grads, chunk_factors = self._chunk(x, y, part, with_curvature)
            nll = nll + chunk_nll
            if grads is None:  # the first chunk's sums are fresh tensors: the rest accumulate into them
                grads, factors = chunk_grads, chunk_factors
            else:
                torch._foreach_add_(grads, chunk_grads)
                if with_curvature:
                    torch._foreach_add_(flatten(factors), flatten(chunk_factors))
        count = num_samples * batch
        if self.parallel is not None:  # sums over all ranks' samples and shards, then the global means
            nll, grads, factors, count = self.parallel.sum_statistics(nll, grads, factors, count)
        torch._foreach_div_([*grads, *(flatten(factors) if with_curvature else [])], count)
        return Statistics(nll / count, grads, factors)

    def _chunk(self, x, y, block_samples, with_curvature):
        """Sums over one chunk of samples: NLL, weight gradients, curvature factors."""
        model, blocks = self.model, self.guide.blocks
        leaves = [s.detach().requires_grad_() for s in block_samples]
        recorder = Recorder(self.kfac_approx == "reduce") if with_curvature else None
        params = self.guide.eigenbasis_layer_params(leaves)
        out = run_sampled(model.net, model.layers, params, x, leaves[0].shape[0], recorder)
        likelihood = model.likelihood
        nll = likelihood.nll(out, y)
        if with_curvature and self.fisher == "mc":  # G from a second backward pass, with labels drawn from the model
            recorder.capturing = False
            weight_grads = torch.autograd.grad(nll, leaves, retain_graph=True)
            recorder.capturing = True
            sampled = likelihood.distribution(out.detach(), validate_args=False).sample()
            # to the leaves, not to the layer outputs: an output modified in place since would stop
            # the pass after the in-place operation, before the hook (weight gradients are discarded)
            torch.autograd.grad(likelihood.nll(out, sampled), leaves)
        else:  # under the empirical Fisher the recorder's hooks take G from this backward pass
            weight_grads = torch.autograd.grad(nll, leaves)
        factors = [recorder.factors(block.name) for block in blocks] if with_curvature else None
        return nll.detach(), [sum_over_samples(g) for g in weight_grads], factors

    @torch.no_grad()
    def update(self, grads, lr, momentum):
        """Eqs. (10, 11) for every block, in eigenbasis coordinates, where (F̂ + γI)⁻¹ is a division by
        the damped eigenvalues (the prior and the weight decay are isotropic, so they read the same
        there); the momentum buffers are updated in place."""
        guide = self.guide
        coupled = guide.prior_precision + (self.weight_decay if self.weight_decay_mode == "coupled" else 0.0)
        decoupled = {"coupled": 0.0, "decoupled": self.weight_decay, "literal": self.weight_decay / lr}
        means = guide.means()
        if coupled:
            grads = torch._foreach_add(grads, means, alpha=coupled)
        torch._foreach_mul_(self.velocities, momentum)
        torch._foreach_addcdiv_(self.velocities, grads, guide.damped_eigenvalues())  # (10)
        if decoupled[self.weight_decay_mode]:
            torch._foreach_add_(self.velocities, means, alpha=decoupled[self.weight_decay_mode])  # (10)
        torch._foreach_add_(means, self.velocities, alpha=-lr)  # (11)

    # ----------------------------------------------------------------------------------------
    def state_dict(self):
        """The iteration, the momentum (in eigenbasis coordinates, like the guide's mean) and γ
        (which ``on_nonfinite="retry"`` may have grown)."""
        return {"iteration": self.iteration, "velocities": [v.clone() for v in self.velocities],
                "damping": self.guide.damping}

    def load_state_dict(self, state):
        self.iteration = int(state["iteration"])
        self.guide.damping = state.get("damping", self.guide.damping)
        for velocity, saved in zip(self.velocities, state["velocities"], strict=True):
            velocity.copy_(saved)
