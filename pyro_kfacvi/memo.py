"""Memoisation of values derived from rarely changing tensors.

The damped eigenvalues (the preconditioner), the sampler's scales and the log-determinant of the
KL change only when the eigenbases are refreshed (every ``inverse_every`` steps) or γ changes, yet
every step needs them; the guide keeps them for all blocks at once (one check per use, not one
per block).
"""
import torch


class DerivedValues:
    """Values computed from some tensors and numbers, kept until one of the tensors is replaced
    (e.g. by ``module.to``) or modified in place (its ``Tensor._version`` moves, as under
    ``copy_`` or ``load_state_dict``), or one of the numbers differs."""

    def __init__(self):
        self._entries = {}

    def get(self, name, tensors, numbers, compute):
        """The value ``name``: ``compute()``, or its result from an earlier call with the same inputs."""
        if torch.is_inference_mode_enabled() or any(t.is_inference() for t in tensors):
            return compute()  # inference tensors have no version counter, and must not leak out
        stamp = (tuple((t, t._version) for t in tensors), tuple(numbers))
        entry = self._entries.get(name)
        if entry is None or not _same_stamp(entry[0], stamp):
            entry = (stamp, compute())
            self._entries[name] = entry
        return entry[1]


def _same_stamp(old, new):
    (old_tensors, old_numbers), (new_tensors, new_numbers) = old, new
    return (old_numbers == new_numbers and len(old_tensors) == len(new_tensors)
            and all(a is b and va == vb for (a, va), (b, vb) in zip(old_tensors, new_tensors)))
