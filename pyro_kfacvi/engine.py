"""The natural-gradient engine: Noisy K-FAC / KFAC-VI with M weight samples per step."""
import dataclasses
import math
import warnings

import torch

from .curvature.estimator import CurvatureConfig, FisherEstimator

WEIGHT_DECAY_MODES = ("coupled", "decoupled", "literal")
NONFINITE_POLICIES = ("raise", "retry")


class NonFiniteStepError(FloatingPointError):
    """A step whose loss, gradients or curvature were not finite (after any retries); nothing changed.
    ``fact`` says what happened, without the advice in API words that the message adds."""

    def __init__(self, fact, advice):
        super().__init__(f"{fact} {advice}")
        self.fact = fact


@dataclasses.dataclass(frozen=True)
class Retry:
    """What a step whose loss, gradients or curvature are not finite does under
    ``on_nonfinite=Retry(...)`` (or ``"retry"``): redraw it with fresh samples and the guide's damping
    multiplied by ``damping_growth``, at most ``max_retries`` times. The larger γ is kept (it lives in
    the guide's state); if every retry fails, γ is restored and ``FloatingPointError`` raised."""

    max_retries: int = 3
    damping_growth: float = 10.0

    def __post_init__(self):
        if isinstance(self.max_retries, bool) or int(self.max_retries) != self.max_retries or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries}")
        if not (self.damping_growth > 1 and math.isfinite(self.damping_growth)):
            raise ValueError(f"damping_growth must be a finite number > 1, got {self.damping_growth}")


def _retry_policy(on_nonfinite):
    """``"raise"`` → ``None``; ``"retry"`` → ``Retry()``; a :class:`Retry` as it is."""
    if isinstance(on_nonfinite, Retry):
        return on_nonfinite
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES} or a Retry, got {on_nonfinite!r}")
    return Retry() if on_nonfinite == "retry" else None


class _Snapshot:
    """What a step may change before it commits — the network's buffers (BatchNorm's running
    statistics) and training mode, the guide's γ (retries grow it) and the RNG states (torch's CPU
    generator and the guide's CUDA device's) — to put back when the step fails."""

    def __init__(self, model, guide):
        self.model, self.guide = model, guide
        self.buffers = [b.clone() for b in model.buffers()]
        self.modes = [m.training for m in model.modules()]
        self.damping = guide.damping
        self.device = guide.means()[0].device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @torch.no_grad()
    def restore_buffers(self):
        for buffer, saved in zip(self.model.buffers(), self.buffers):
            buffer.copy_(saved)

    def restore(self):
        self.restore_buffers()
        for module, training in zip(self.model.modules(), self.modes):
            module.training = training
        self.guide.damping = self.damping
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


class KFACVI:
    r"""SVI-style natural-gradient variational inference with a Kronecker guide
    (:class:`~pyro_kfacvi.KroneckerNormal` or :class:`~pyro_kfacvi.KroneckerDelta`).

    Each :meth:`step` draws M = ``num_particles`` weight samples θ_s ~ q, asks the curvature
    estimator (:mod:`pyro_kfacvi.curvature`) for the statistics of the minibatch and updates the
    guide in place (equation numbers of DEVELOPERS.md):

    * (7)  ḡ = −(1/MB) Σ_s Σ_n ∇_θ log p(y_n | x_n, θ_s)
    * (8)  F̄ = (1/MB) Σ_s Σ_n of the same per-example outer products, as A ⊗ G
    * (9)  F̂ ← (1 − β) F̂ + β F̄
    * (10) v ← (F̂ + γI)⁻¹ (ḡ + π μ) + decay + m_t v
    * (11) μ ← μ − α_t v
    * (12) Σ as the guide's family defines it

    All of it happens in the eigenbasis of each block's F̂ (Z = Q_Gᵀ W̃ Q_A for a Kronecker block),
    where (F̂ + γI)⁻¹ and Σ are diagonal: the samples are drawn there elementwise, the layers
    return ḡ there, eq. (10) divides by the guide's damped eigenvalues
    (:meth:`~pyro_kfacvi.guides.KroneckerGuide.preconditioner`), and μ and v stay there,
    re-expressed whenever the eigenbases are recomputed. π is the guide's prior precision
    (κ/(Nη) for the ELBO-exact :class:`~pyro_kfacvi.KroneckerNormal`, else 0); γ is the guide's
    damping. The weight decay λ enters as ``weight_decay_mode``:

    * ``"coupled"``: (F̂ + γI)⁻¹ (ḡ + π μ + λ μ) — an L2 penalty inside the preconditioner;
    * ``"decoupled"``: + λ μ after preconditioning — μ shrinks by α_t λ per step, fading with α_t;
    * ``"literal"``: + (λ / α_t) μ, eq. (10) as printed — μ shrinks by λ per step whatever α_t.

    :param model: :class:`~pyro_kfacvi.BayesianModel`.
    :param guide: a :class:`~pyro_kfacvi.guides.KroneckerGuide` of that model.
    :param lr: α, a float or a schedule ``t ↦ α_t`` (e.g. :class:`~pyro_kfacvi.WarmupPolynomialLR`,
        whose ``momentum_scale`` also sets m_t, eq. 6). Default 0.3: with the trust region below, a
        natural-gradient step that is a sizeable fraction of a Newton step where the quadratic model
        allows it (docs/robustness.md, "Defaults").
    :param float momentum: m (m_base under a schedule); default 0.9.
    :param float weight_decay: λ.
    :param str weight_decay_mode: see above.
    :param int num_particles: M.
    :param CurvatureConfig curvature: the Fisher type, Kronecker approximation, β of eq. (9) and
        the refresh intervals (default: ``CurvatureConfig()``).
    :param float kl_clip: c of the trust region: each step is scaled down so that the quadratic
        model's change of the objective per datum, ½α²vᵀ(F̂ + γI)v, stays ≤ c (:meth:`trust_region_factor`);
        default 1e-2; ``None``: no bound (the paper's update).
    :param on_nonfinite: ``"raise"`` a ``FloatingPointError`` for a step whose loss, gradients or
        curvature are not finite, or ``"retry"`` / a :class:`Retry` (its doc). A rejected attempt
        changes nothing: μ, F̂, the eigenbases, the momentum and the network's buffers stay as they were.
    :param parallel: a :class:`~pyro_kfacvi.distributed.ParallelPlan` to share each step with other
        processes: this rank's samples come from its sample stream, and eqs. (7, 8) are summed over
        all ranks before the update, so every :meth:`step` is a collective call (``None``: one process).
    """

    def __init__(self, model, guide, lr=0.3, momentum=0.9, weight_decay=0.0, weight_decay_mode="decoupled",
                 num_particles=1, curvature=None, kl_clip=1e-2, on_nonfinite="raise", parallel=None):
        if guide.model is not model:
            raise ValueError("the guide was built for a different model")
        if not callable(lr) and not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number or a schedule, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        if isinstance(num_particles, bool) or int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
        if guide.distinct_draws(num_particles) < num_particles:
            raise ValueError(f"num_particles={num_particles} draws {num_particles} identical samples from a "
                             f"{type(guide).__name__}; use num_particles=1")
        if guide.preconditioner_damping == 0:
            raise ValueError("damping=0 leaves F̂ + γI singular wherever F̂ is (dead units, unused inputs) and "
                             "a retry cannot grow it; give the guide damping > 0 (e.g. 1e-3)")
        self.model, self.guide = model, guide
        self.lr, self.momentum, self.weight_decay = lr, float(momentum), float(weight_decay)
        self.weight_decay_mode, self.num_particles = weight_decay_mode, int(num_particles)
        self.curvature = curvature if curvature is not None else CurvatureConfig()
        self.estimator = FisherEstimator(self.curvature)
        self.retry = _retry_policy(on_nonfinite)
        if kl_clip is not None and not (kl_clip > 0 and math.isfinite(kl_clip)):
            raise ValueError(f"kl_clip must be None or a positive number, got {kl_clip}")
        self.kl_clip = kl_clip
        self.parallel = parallel
        self.iteration = 0
        self.last_complexity = None  # the complexity term of the loss the last step returned
        self.velocities = [torch.zeros_like(mean) for mean in guide.means()]  # eigenbasis coordinates

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
        before the update (for a point mass: the negative log joint per datum).

        Bad input (shapes, dtypes, NaN/Inf in ``x``, targets outside the likelihood's support) raises
        before any work; non-finite statistics are handled as ``on_nonfinite`` says. Whatever fails
        inside the step — non-finite statistics, an exception from the network — the guide, the
        engine, the network's buffers and mode and the RNG state are left as they were before it.
        A model in eval mode is put in training mode (submodules that were switched to eval mode on
        their own stay so). :attr:`last_complexity` then holds the loss's complexity term (the
        guide's ``complexity()`` before the update, a tensor), for a training loop that reports it apart."""
        self.model.check_batch(x, y)
        self.model.check_values(x, y)
        snapshot = _Snapshot(self.model, self.guide)
        try:
            if not self.model.training:
                self.model.train()
            with_curvature = self.iteration % self.curvature.curvature_every == 0
            stats, loss = self.finite_statistics(x, y, with_curvature, snapshot)
            refresh = self.iteration % self.curvature.inverse_every == 0
            update = self.guide.curvature_update(stats.factors, self.curvature.beta, refresh,  # (9)
                                                 self.curvature.track_eigenvalues)
        except BaseException:
            snapshot.restore()
            raise
        self.apply(stats, update)
        return loss

    def apply(self, stats, update):
        """The rest of a step, given its finite statistics and the guide's curvature update (eq. 9 and
        new eigenbases, computed and not yet stored): stores it, then eqs. (10, 11); advances the iteration."""
        t = self.iteration
        means = self.guide.means()
        if self.velocities[0].device != means[0].device:  # the guide was moved after the engine was built
            self.velocities = [v.to(means[0].device) for v in self.velocities]
        # ḡ, drawn in the old eigenbases, moves along with μ and v
        self.guide.commit_curvature(update, carried=list(zip(self.velocities, stats.grads)))
        self.update(stats.grads, *self.hyperparameters(t))
        self.model.update_hyperparameters(stats, self.guide)
        self.iteration += 1

    def statistics(self, x, y, block_samples, with_curvature=True):
        """Eqs. (7, 8) per (sample, example) for the given block samples, summed over all ranks under
        ``parallel`` (:class:`~pyro_kfacvi.curvature.Statistics`)."""
        sums = self.estimator.sums(self.model, self.guide, x, y, block_samples, with_curvature)
        if self.parallel is not None:  # sums over all ranks' samples and shards, then the global means
            sums = self.parallel.sum_statistics(sums)
        return sums.means_()

    def finite_statistics(self, x, y, with_curvature, snapshot):
        """Eqs. (7, 8) and the loss (a number) for fresh weight samples, checked for finiteness and,
        under a retry policy, redrawn with a larger damping until finite. The forward pass moves
        BatchNorm's running statistics: a rejected attempt restores the network's buffers (``snapshot``)."""
        damping = self.guide.damping
        attempts = 1 + (self.retry.max_retries if self.retry is not None else 0)
        for attempt in range(1, attempts + 1):
            stats = self.statistics(x, y, self.sample_blocks(), with_curvature)
            complexity = self.guide.complexity()
            finite, loss = stats.all_finite(stats.nll + complexity)
            if finite:
                self.last_complexity = complexity
                return stats, loss
            snapshot.restore_buffers()
            fault = (f"non-finite loss, gradient or curvature at iteration {self.iteration} (loss {loss:.4g}); "
                     "the guide was left unchanged.")
            if attempt == attempts:
                if attempts == 1:
                    raise NonFiniteStepError(fault, "Typical causes: a learning rate too large for the damping "
                                             "(increase the guide's damping, lower lr or kl_clip, use "
                                             "on_nonfinite='retry'), or a diverged run.")
                growth = self.retry.damping_growth
                raise NonFiniteStepError(f"{fault} {attempts - 1} retries with the damping grown up to "
                                         f"{damping * growth ** (attempts - 1):.3g} failed too; the damping is "
                                         f"back at {damping:.3g}.", "Lower lr or kl_clip.")
            self.guide.damping *= self.retry.damping_growth
            warnings.warn(f"{fault} Retrying ({attempt} of {attempts - 1}) with damping {self.guide.damping:.3g}.",
                          RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def evaluate_loss(self, x, y):
        """The negative ELBO per datum on ``(x, y)`` with M fresh samples, without updating the guide.
        The network runs in its current mode (in training mode BatchNorm's running statistics move)."""
        self.model.check_batch(x, y)
        with torch.enable_grad():
            stats = self.statistics(x, y, self.sample_blocks(), with_curvature=False)
        return (stats.nll + self.guide.complexity()).item()

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
        preconditioner = guide.preconditioner()
        torch._foreach_mul_(self.velocities, momentum)
        torch._foreach_addcdiv_(self.velocities, grads, preconditioner)  # (10)
        if decoupled[self.weight_decay_mode]:
            torch._foreach_add_(self.velocities, means, alpha=decoupled[self.weight_decay_mode])  # (10)
        if self.kl_clip is not None:
            torch._foreach_mul_(self.velocities, self.trust_region_factor(lr, preconditioner))
        torch._foreach_add_(means, self.velocities, alpha=-lr)  # (11)

    def trust_region_factor(self, lr, preconditioner):
        """ν = min(1, √(2c / (α² vᵀ(F̂ + γI)v))): the factor that bounds the quadratic model's change of
        the objective per datum, ½α²vᵀ(F̂ + γI)v — a KL between the predictives before and after the
        step for the Fisher — by c = ``kl_clip`` (Ba et al. 2017; torchsso's and NNG's KL clipping).
        A tensor: no host synchronisation."""
        squares = torch._foreach_mul(self.velocities, self.velocities)
        quadratic = torch.stack([torch.sum(sq * e) for sq, e in zip(squares, preconditioner)]).sum()
        return (2 * self.kl_clip / (lr * lr * quadratic)).sqrt().clamp(max=1.0)

    # ----------------------------------------------------------------------------------------
    def config(self):
        """The constructor's arguments as plain values, but the model, the guide, the ``parallel``
        plan and ``lr`` (a number or a schedule: :mod:`pyro_kfacvi.io` stores it): what
        :func:`pyro_kfacvi.io.load` rebuilds the engine from."""
        return {"momentum": self.momentum, "weight_decay": self.weight_decay,
                "weight_decay_mode": self.weight_decay_mode, "num_particles": self.num_particles,
                "curvature": dataclasses.asdict(self.curvature), "kl_clip": self.kl_clip,
                "on_nonfinite": "raise" if self.retry is None else dataclasses.asdict(self.retry)}

    def state_dict(self):
        """The iteration and the momentum (in eigenbasis coordinates, like the guide's mean); γ is
        the guide's and travels in its state_dict."""
        return {"iteration": self.iteration, "velocities": [v.clone() for v in self.velocities]}

    def load_state_dict(self, state):
        velocities = state["velocities"]
        if len(velocities) != len(self.velocities) or any(
                saved.shape != v.shape for saved, v in zip(velocities, self.velocities)):
            raise ValueError("the engine state's momentum does not fit this guide's blocks")
        self.iteration = int(state["iteration"])
        for velocity, saved in zip(self.velocities, velocities):
            velocity.copy_(saved)
