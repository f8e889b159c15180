"""Curvature back-ends: moving averages of the Fisher, their eigenbases and exact damping.

Each back-end stores F̂ for one posterior block and describes it in the eigenbasis of F̂ (where
damping is exact, as in the noisy natural gradient reference code):

* ``eigenvalues(γ)``: the grid of eigenvalues of F̂ + γI, shaped like the block;
* ``to_eigenbasis(w)`` / ``from_eigenbasis(z)``: the orthogonal change of basis;
* ``refresh(carried)``: new eigenbases, with block tensors held in the old one re-expressed.

:class:`KroneckerFactors` keeps F̂ ≈ A ⊗ G (A: input second moments with the homogeneous
coordinate, G: output-gradient second moments). With A = Q_A diag(e_A) Q_Aᵀ and
G = Q_G diag(e_G) Q_Gᵀ, a block W̃ has eigenbasis coordinates Z = Q_Gᵀ W̃ Q_A, in which the
damped curvature is diagonal: (A ⊗ G + γI)⁻¹ vec(V) = vec(Q_G [(Q_Gᵀ V Q_A) ⊘ (e_G e_Aᵀ + γ)] Q_Aᵀ).
:class:`DiagonalFactors` keeps a diagonal F̂ (used for BatchNorm's scale and shift).

What derives from the spectra (damped eigenvalues, q's scales, the KL's constant) is memoised by
the guide until the next refresh or change of γ (:mod:`pyro_kfacvi.memo`).
"""
import torch
from torch import nn


def ema_(average, new, beta, initialized):
    """Eq. (9): F̂ ← (1 − β) F̂ + β F̄; the first estimate replaces the initial value."""
    if initialized:
        average.lerp_(new, beta)
    else:
        average.copy_(new)


def symmetric_eigh(matrix):
    """Eigendecomposition of a PSD matrix: symmetrised, with eigenvalues clamped at zero
    (round-off makes them slightly negative). LAPACK can fail in float32 — by raising, or
    silently with NaN output when the matrix holds denormal numbers (e.g. G of dead ReLU
    units) — so a failed or non-finite float32 result is redone in float64."""
    sym = 0.5 * (matrix + matrix.T)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(sym)
        ok = bool(torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all())
    except RuntimeError:
        ok = False
    if not ok:
        eigenvalues, eigenvectors = torch.linalg.eigh(sym.double())
    return eigenvalues.clamp_min(0).to(matrix.dtype), eigenvectors.to(matrix.dtype)


class KroneckerFactors(nn.Module):
    """F̂ ≈ A ⊗ G for a block matrix W̃ like ``like`` ``(d_out, d_in)``; A is (d_in, d_in), G is (d_out, d_out)."""

    def __init__(self, like, split_damping=False):
        super().__init__()
        self.split_damping = split_damping
        d_out, d_in = like.shape
        options = {"dtype": like.dtype, "device": like.device}
        for side, dim in (("A", d_in), ("G", d_out)):
            self.register_buffer(side, torch.eye(dim, **options))
            self.register_buffer(f"eigenvalues_{side}", torch.ones(dim, **options))
            self.register_buffer(f"eigenvectors_{side}", torch.eye(dim, **options))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, factors, beta):
        """Eq. (9) for each Kronecker factor, ``factors = (A_bar, G_bar)``."""
        initialized = bool(self.initialized)
        ema_(self.A, factors[0], beta, initialized)
        ema_(self.G, factors[1], beta, initialized)
        self.initialized.fill_(True)

    @torch.no_grad()
    def refresh(self, carried=()):
        """Recompute the eigenbases of A and G; the block tensors ``carried`` (coordinates in the
        old eigenbasis, e.g. the mean and the momentum) are re-expressed in the new one
        (:meth:`PosteriorBlock.refresh <pyro_kfacvi.guide.PosteriorBlock.refresh>` carries the mean)."""
        weights = [self.from_eigenbasis(z) for z in carried]
        for side in ("A", "G"):
            values, vectors = symmetric_eigh(getattr(self, side))
            getattr(self, f"eigenvalues_{side}").copy_(values)
            getattr(self, f"eigenvectors_{side}").copy_(vectors)
        for z, w in zip(carried, weights):
            z.copy_(self.to_eigenbasis(w))

    def eigenvalues(self, damping):
        """Eigenvalues of the damped curvature arranged as the block: e_G[i]·e_A[j] + γ (exact),
        or (e_G[i] + √γ/π)(e_A[j] + π√γ) for ``split_damping`` — the factored damping of K-FAC and
        torchsso, (A + π√γ I) ⊗ (G + √γ/π I), with the trace-norm π = √((tr A/d_A)/(tr G/d_G))."""
        if not self.split_damping:
            return torch.outer(self.eigenvalues_G, self.eigenvalues_A) + damping
        return torch.outer(*self.damped_factor_eigenvalues(damping))

    def damped_factor_eigenvalues(self, damping):
        """Split damping: the eigenvalues (e_G + √γ/π, e_A + π√γ) of the damped factors."""
        e_a, e_g = self.eigenvalues_A, self.eigenvalues_G
        pi = (e_a.mean() / e_g.mean().clamp_min(torch.finfo(e_g.dtype).tiny)).sqrt()
        root = damping ** 0.5
        return e_g + root / pi, e_a + root * pi

    SPECTRUM = ("eigenvalues_A", "eigenvalues_G")

    def spectrum_buffers(self):
        """The tensors that the damped eigenvalues derive from, which stamp the guide's memo."""
        buffers = self._buffers
        return tuple(buffers[name] for name in self.SPECTRUM)

    def to_eigenbasis(self, w):
        return self.eigenvectors_G.T @ w @ self.eigenvectors_A

    def from_eigenbasis(self, z):
        return self.eigenvectors_G @ z @ self.eigenvectors_A.T

    def dense(self):
        """The dense matrix A ⊗ G acting on column-major vec(W̃) (for tests and small layers)."""
        return torch.kron(self.A, self.G)


class DiagonalFactors(nn.Module):
    """Diagonal F̂ for a block vector like ``like`` ``(d,)``."""

    def __init__(self, like, split_damping=False):
        super().__init__()
        self.register_buffer("diagonal", torch.ones_like(like))  # split damping is exact for a diagonal
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, factors, beta):
        ema_(self.diagonal, factors[0], beta, bool(self.initialized))
        self.initialized.fill_(True)

    def refresh(self, carried=()):
        """The eigenbasis of a diagonal matrix is the identity: nothing to do."""

    def eigenvalues(self, damping):
        return self.diagonal + damping

    def spectrum_buffers(self):
        return (self._buffers["diagonal"],)

    def to_eigenbasis(self, w):
        return w

    def from_eigenbasis(self, z):
        return z
