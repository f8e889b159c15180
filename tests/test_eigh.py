"""Eigendecompositions of the Kronecker factors cannot crash a step: zero rows are deflated,
repeated eigenvalues and failures of LAPACK are handled, and a last fallback names the block."""
import warnings

import pytest
import torch

from pyro_kfacvi.curvature import factors
from pyro_kfacvi.curvature.factors import EigendecompositionWarning, symmetric_eigh


def reconstruct(values, vectors):
    return vectors @ torch.diag(values) @ vectors.T


def random_psd(d, rank=None, dtype=torch.float64):
    x = torch.randn(d, rank or d, dtype=dtype)
    return x @ x.T / d


def test_zero_rows_are_deflated_to_unit_eigenvectors():
    torch.manual_seed(0)
    live = random_psd(5)
    matrix = torch.zeros(9, 9, dtype=torch.float64)
    index = torch.tensor([0, 2, 3, 6, 8])
    matrix[index.unsqueeze(1), index] = live
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deflation is not a fallback: no warning
        values, vectors = symmetric_eigh(matrix)
    assert torch.allclose(reconstruct(values, vectors), matrix, atol=1e-12)
    assert torch.allclose(vectors.T @ vectors, torch.eye(9, dtype=torch.float64), atol=1e-12)
    for dead in (1, 4, 5, 7):
        assert values[dead] == 0 and vectors[dead, dead] == 1 and vectors[dead].abs().sum() == 1
    assert torch.allclose(values[index].sort().values, torch.linalg.eigvalsh(live), atol=1e-12)


def test_repeated_eigenvalues_and_a_rank_deficient_factor():
    torch.manual_seed(1)
    for matrix in (3.0 * torch.eye(6, dtype=torch.float64), random_psd(8, rank=3)):
        values, vectors = symmetric_eigh(matrix)
        assert torch.allclose(reconstruct(values, vectors), matrix, atol=1e-12)
        assert (values >= 0).all()


def failing_eigh(fail_for):
    """``torch.linalg.eigh`` that raises for inputs of the dtypes in ``fail_for`` (and jittered ones if 'all')."""
    original = torch.linalg.eigh

    def eigh(matrix):
        if matrix.dtype in fail_for or "all" in fail_for:
            raise torch.linalg.LinAlgError("injected failure")
        return original(matrix)
    return eigh


def test_a_float32_failure_is_redone_in_float64(monkeypatch):
    matrix = random_psd(6, dtype=torch.float32)
    monkeypatch.setattr(factors.torch.linalg, "eigh", failing_eigh({torch.float32}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, vectors = symmetric_eigh(matrix, "fc1 (A)")
    assert values.dtype == torch.float32
    assert torch.allclose(reconstruct(values, vectors), matrix, atol=1e-5)


def test_the_last_fallback_is_the_diagonal_with_a_warning_naming_the_block(monkeypatch):
    matrix = random_psd(6)
    monkeypatch.setattr(factors.torch.linalg, "eigh", failing_eigh({"all"}))
    with pytest.warns(EigendecompositionWarning, match="block 'layer4.1.conv2 \\(A\\)'.*diagonal"):
        values, vectors = symmetric_eigh(matrix, "layer4.1.conv2 (A)")
    assert torch.equal(vectors, torch.eye(6, dtype=torch.float64))
    assert torch.equal(values, matrix.diagonal())


def test_a_jitter_rescues_a_decomposition_that_fails_without_it(monkeypatch):
    matrix = random_psd(5)
    original = torch.linalg.eigh

    def eigh(m):  # fails unless the diagonal was moved (a jittered copy)
        if torch.equal(m.diagonal(), matrix.diagonal().to(m.dtype)):
            raise torch.linalg.LinAlgError("injected failure")
        return original(m)
    monkeypatch.setattr(factors.torch.linalg, "eigh", eigh)
    with pytest.warns(EigendecompositionWarning, match="jitter"):
        values, vectors = symmetric_eigh(matrix, "fc2 (G)")
    assert torch.allclose(reconstruct(values, vectors), matrix, atol=1e-8)
