"""Memoisation of values derived from rarely changing tensors.

The damped eigenvalues (the preconditioner), the sampler's scales and the log-determinant of the
KL change only when the eigenbases are refreshed (every ``inverse_every`` steps) or γ changes, yet
every step needs them; the guide keeps them for all blocks at once (one check per use, not one
per block).
"""
import operator
from dataclasses import dataclass

import torch


class DerivedValues:
    """Values computed from some tensors and numbers, kept until one of the tensors is replaced
    (e.g. by ``module.to``) or modified in place (its ``Tensor._version`` moves, as under
    ``copy_`` or ``load_state_dict``), or one of the numbers differs."""

    def __init__(self):
        self._entries = {}

    def get(self, name, tensors, numbers, compute):
        """The value ``name``: ``compute()``, or its result from an earlier call with the same inputs."""
        if torch.is_inference_mode_enabled():
            return compute()
        try:
            versions = [t._version for t in tensors]
        except RuntimeError:  # an inference tensor has no version counter, and must not leak out
            return compute()
        numbers = tuple(numbers)
        entry = self._entries.get(name)
        if entry is None or not entry.matches(tensors, versions, numbers):
            entry = _Entry(list(tensors), versions, numbers, compute())
            self._entries[name] = entry
        return entry.value


@dataclass
class _Entry:
    tensors: list
    versions: list
    numbers: tuple
    value: object

    def matches(self, tensors, versions, numbers):
        # equal version lists have equal lengths: the identity check covers every tensor
        return self.numbers == numbers and self.versions == versions and all(map(operator.is_, self.tensors, tensors))
