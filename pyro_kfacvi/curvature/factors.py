r"""Curvature storage: the moving averages of eq. (9), their eigenbases, and damping made exact there.

Each back-end stores F̂ for one posterior block and describes it in the eigenbasis of F̂:

* ``eigenvalues(γ)``: the grid of eigenvalues of F̂ + γI, shaped like the block;
* ``to_eigenbasis(w)`` / ``from_eigenbasis(z)``: the orthogonal change of basis;
* ``averaged(F̄, β)`` → ``decompose(F̂)`` → ``commit(F̂, spectrum, carried)``: eq. (9) and new
  eigenbases in three stages, the first two without side effects, so that a step that fails in
  them (a non-finite statistic, an eigendecomposition) leaves the back-end as it was.

:class:`KroneckerFactors` keeps F̂ ≈ A ⊗ G (A: input second moments with the homogeneous
coordinate, G: output-gradient second moments). With A = Q_A diag(e_A) Q_Aᵀ and
G = Q_G diag(e_G) Q_Gᵀ, a block W̃ has eigenbasis coordinates Z = Q_Gᵀ W̃ Q_A, in which the
damped curvature is diagonal: (A ⊗ G + γI)⁻¹ vec(V) = vec(Q_G [(Q_Gᵀ V Q_A) ⊘ (e_G e_Aᵀ + γ)] Q_Aᵀ).
:class:`DiagonalFactors` keeps a diagonal F̂ (used for BatchNorm's scale and shift).
"""
import warnings

import torch
from torch import nn


class EigendecompositionWarning(RuntimeWarning):
    """An eigendecomposition needed a fallback (jitter, or a diagonal approximation)."""


def _eigh(matrix):
    """``torch.linalg.eigh`` that reports failure — an exception, or silently non-finite output
    (LAPACK on float32 matrices holding denormal numbers, e.g. G of dead ReLU units) — as ``None``."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:
        return None
    return (values, vectors) if bool(torch.isfinite(values).all() and torch.isfinite(vectors).all()) else None


def _jittered_eigh(sym, name):
    """Eigendecomposition of ``sym`` in float64 with a jitter of 1e-10·max|diag| on the diagonal; if that
    fails too, the diagonal approximation (eigenvectors I, eigenvalues the diagonal). Both with an
    :class:`EigendecompositionWarning` naming the block. Cannot raise."""
    jitter = 1e-10 * float(sym.diagonal().abs().max().clamp_min(1.0))
    result = _eigh(sym.double() + jitter * torch.eye(sym.shape[0], dtype=torch.float64, device=sym.device))
    if result is not None:
        warnings.warn(f"block '{name}': eigendecomposition needed a jitter of {jitter:.3g}", EigendecompositionWarning)
        return result
    warnings.warn(f"block '{name}': eigendecomposition failed in float32 and float64, with and without jitter; "
                  "using the diagonal of the factor for this refresh", EigendecompositionWarning)
    return sym.diagonal().nan_to_num(0.0, 0.0, 0.0), torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)


def _dense_eigh(sym, name):
    """In float32, else in float64, else :func:`_jittered_eigh`."""
    return _eigh(sym) or _eigh(sym.double()) or _jittered_eigh(sym, name)


def _deflated_eigh(sym, name):
    """Eigendecomposition of ``sym`` with its exactly zero rows and columns deflated (eigenvalue 0,
    unit eigenvectors) and the rest decomposed by :func:`_dense_eigh`."""
    index = sym.ne(0).any(0).nonzero().squeeze(1)
    values = torch.zeros(sym.shape[0], dtype=sym.dtype, device=sym.device)
    vectors = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    if index.numel():
        live = sym[index][:, index]
        live_values, live_vectors = _dense_eigh(live, name)
        values[index] = live_values.to(sym.dtype)
        vectors[index.unsqueeze(1), index] = live_vectors.to(sym.dtype)
    return values, vectors


def symmetric_eigh(matrix, name="?"):
    """Eigendecomposition of a PSD factor: symmetrised, eigenvalues clamped at zero (round-off makes
    them slightly negative). Rows and columns that are exactly zero (inputs a layer never sees, e.g.
    the padding-only patches of a 1×1 feature map, or units that are dead on every example) are
    deflated: their eigenvectors are unit vectors with eigenvalue 0, and only the rest is decomposed
    (:func:`_deflated_eigh`; a 4608 × 4608 factor with 512 live rows costs what a 512 × 512 one does).
    It cannot raise: LAPACK can fail in float32 — by raising, or silently with NaN output when the
    matrix holds denormal numbers (e.g. G of nearly dead units) — so a failed float32 result is
    redone in float64, then with a jitter, and at last replaced by the diagonal (:func:`_jittered_eigh`)."""
    sym = 0.5 * (matrix + matrix.T)
    if bool(sym.ne(0).any(0).all()):
        values, vectors = _dense_eigh(sym, name)
    else:
        values, vectors = _deflated_eigh(sym, name)
    return values.clamp_min(0).to(sym.dtype), vectors.to(sym.dtype)


class KroneckerFactors(nn.Module):
    """F̂ ≈ A ⊗ G for a block matrix W̃ like ``like`` ``(d_out, d_in)``; A is (d_in, d_in), G is (d_out, d_out).

    :param str name: the block's name, for warnings."""

    SIDES = ("A", "G")

    def __init__(self, like, name="?"):
        super().__init__()
        self.name = name
        d_out, d_in = like.shape
        options = {"dtype": like.dtype, "device": like.device}
        for side, dim in zip(self.SIDES, (d_in, d_out)):
            self.register_buffer(side, torch.eye(dim, **options))
            self.register_buffer(f"eigenvalues_{side}", torch.ones(dim, **options))
            self.register_buffer(f"eigenvectors_{side}", torch.eye(dim, **options))
        self.register_buffer("initialized", torch.tensor(False))

    def factors(self):
        """The stored factors ``(A, G)``."""
        return self.A, self.G

    @torch.no_grad()
    def averaged(self, new, beta):
        """Eq. (9), F̂ ← (1 − β) F̂ + β F̄, for ``new = (Ā, Ḡ)``, as new tensors; the first estimate
        replaces the initial identity."""
        if not bool(self.initialized):
            return tuple(new)
        return tuple(torch.lerp(old, fresh, beta) for old, fresh in zip(self.factors(), new))

    @torch.no_grad()
    def decompose(self, factors):
        """The eigendecompositions ``((e_A, Q_A), (e_G, Q_G))`` of ``factors`` (:func:`symmetric_eigh`)."""
        return tuple(symmetric_eigh(f, f"{self.name} ({side})") for f, side in zip(factors, self.SIDES))

    @torch.no_grad()
    def rayleigh_quotients(self, factors):
        """The eigenvalues of ``factors`` in the kept eigenbases, ``((diag(Q_Aᵀ A Q_A), None),
        (diag(Q_Gᵀ G Q_G), None))`` (``None``: the bases stay), for :meth:`commit`."""
        return tuple(((vectors * (factor @ vectors)).sum(0).clamp_min(0), None)
                     for factor, vectors in zip(factors, (self.eigenvectors_A, self.eigenvectors_G)))

    @torch.no_grad()
    def commit(self, factors, spectrum=None, carried=()):
        """Store ``factors`` (eq. 9) and, if given, the ``spectrum`` of :meth:`decompose` (or of
        :meth:`rayleigh_quotients`, which keeps the bases); with new bases, the block tensors
        ``carried`` (coordinates in the old eigenbasis, e.g. the mean and the momentum) are
        re-expressed in them."""
        for side, factor in zip(self.SIDES, factors):
            getattr(self, side).copy_(factor)
        self.initialized.fill_(True)
        if spectrum is None:
            return
        new_bases = spectrum[0][1] is not None
        weights = [self.from_eigenbasis(z) for z in carried] if new_bases else []
        for side, (values, vectors) in zip(self.SIDES, spectrum):
            getattr(self, f"eigenvalues_{side}").copy_(values)
            if new_bases:
                getattr(self, f"eigenvectors_{side}").copy_(vectors)
        for z, w in zip(carried, weights):
            z.copy_(self.to_eigenbasis(w))

    def eigenvalues(self, damping):
        """Eigenvalues of A ⊗ G + γI arranged as the block: e_G[i]·e_A[j] + γ."""
        return torch.outer(self.eigenvalues_G, self.eigenvalues_A) + damping

    def split_eigenvalues(self, damping):
        """Eigenvalues of the factored damping of K-FAC and torchsso, (A + π√γ I) ⊗ (G + √γ/π I),
        arranged as the block, with the trace-norm π = √((tr A/d_A)/(tr G/d_G))."""
        e_a, e_g = self.eigenvalues_A, self.eigenvalues_G
        pi = (e_a.mean() / e_g.mean().clamp_min(torch.finfo(e_g.dtype).tiny)).sqrt()
        root = damping ** 0.5
        return torch.outer(e_g + root / pi, e_a + root * pi)

    def spectrum_buffers(self):
        """The tensors that the damped eigenvalues derive from, which stamp the guide's memo."""
        return self.eigenvalues_A, self.eigenvalues_G

    def to_eigenbasis(self, w):
        return self.eigenvectors_G.T @ w @ self.eigenvectors_A

    def from_eigenbasis(self, z):
        return self.eigenvectors_G @ z @ self.eigenvectors_A.T

    def dense(self):
        """The dense matrix A ⊗ G acting on column-major vec(W̃) (for tests and small layers)."""
        return torch.kron(self.A, self.G)


class DiagonalFactors(nn.Module):
    """Diagonal F̂ for a block vector like ``like`` ``(d,)``; its eigenbasis is the identity."""

    def __init__(self, like, name="?"):
        super().__init__()
        self.name = name
        self.register_buffer("diagonal", torch.ones_like(like))
        self.register_buffer("initialized", torch.tensor(False))

    def factors(self):
        return (self.diagonal,)

    @torch.no_grad()
    def averaged(self, new, beta):
        """Eq. (9) for the diagonal, as a new tensor."""
        return (torch.lerp(self.diagonal, new[0], beta),) if bool(self.initialized) else tuple(new)

    def decompose(self, factors):
        """Nothing to decompose."""
        return ()

    rayleigh_quotients = decompose  # the diagonal is its own spectrum

    @torch.no_grad()
    def commit(self, factors, spectrum=None, carried=()):
        self.diagonal.copy_(factors[0])
        self.initialized.fill_(True)

    def eigenvalues(self, damping):
        return self.diagonal + damping

    split_eigenvalues = eigenvalues  # split damping is exact for a diagonal

    def spectrum_buffers(self):
        return (self.diagonal,)

    def to_eigenbasis(self, w):
        return w

    def from_eigenbasis(self, z):
        return z
