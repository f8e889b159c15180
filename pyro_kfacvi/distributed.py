r"""KFAC-VI across processes and GPUs on ``torch.distributed`` (launched by ``torchrun``).

R = D·S processes share one step. Rank r sits at ``(d, s) = divmod(r, S)`` of a grid of D data
shards and S sample groups: it runs the network on shard d of the global minibatch of D·B
examples with the weight samples s·M … (s+1)·M − 1 of the step's S·M samples. Three modes fix
the grid: ``"samples"`` (D = 1, S = R: every rank sees the same minibatch with its own weight
samples), ``"data"`` (D = R, S = 1: every rank draws the same M samples for its own shard) and
``"both"`` (D·S = R).

Eqs. (7, 8) are sums over (sample, example) pairs divided by their count, so each rank computes
its partial sums and one all-reduce adds them,

.. math:: ḡ = \frac{Σ_r Σ_{s ∈ S_r} Σ_{n ∈ B_r} ∇_θ(−\log p(y_n | x_n, θ_s))}{Σ_r |S_r|·|B_r|},

and likewise for the NLL and the factors A and G. After it every rank holds the statistics of
one process with S·M samples and D·B examples, and runs the rest of the step — moving averages
(9), eigendecompositions and update (10, 11) — on identical inputs, so μ stays identical on all
ranks without further communication. The eigendecompositions are *replicated*, not split over
ranks as in KAISA: each rank pays the full ``O(Σ d³)`` every ``inverse_every`` steps but nothing
is broadcast.

The noise of weight sample i at step t comes from a generator of its own, seeded by
``(seed, t, i)`` (:func:`stream_seed`). A sample therefore does not depend on which process draws
it or which other samples are drawn: R ranks × M samples see exactly the samples 0 … R·M − 1 of
one process with R·M samples (the tests compare the two to 1e-10 in float64).
"""
import os

import numpy as np
import torch
import torch.distributed as dist

from .curvature.estimator import Statistics

__all__ = ["MODES", "Communicator", "ParallelPlan", "draw_weight_samples", "grid", "init_process_group",
           "launched_by_torchrun", "payload_bytes", "stream_seed"]

MODES = ("samples", "data", "both")


def stream_seed(seed, *key):
    """A 63-bit seed for the random stream ``key`` (a tuple of integers ≥ 0): numpy's
    ``SeedSequence(seed, spawn_key=key)`` hash, so that distinct keys give independent streams.
    Weight sample i of step t uses the key ``(t, i)``."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def draw_weight_samples(guide, seed, step, indices):
    """The weight samples ``indices`` of ``step`` in eigenbasis coordinates, per block
    ``(len(indices), *block_shape)`` (:meth:`KroneckerGuide.sample_eigenbasis_blocks
    <pyro_kfacvi.guides.KroneckerGuide.sample_eigenbasis_blocks>`), the noise of sample i drawn,
    block after block, from a generator seeded by :func:`stream_seed` ``(seed, step, i)``."""
    def noise(shapes):
        device = guide.means()[0].device
        per_sample = []
        for index in indices:
            generator = torch.Generator(device).manual_seed(stream_seed(seed, step, index))
            per_sample.append([torch.randn(shape[1:], generator=generator, dtype=m.dtype, device=device)
                               for shape, m in zip(shapes, guide.means())])
        return [torch.stack(eps) for eps in zip(*per_sample)]

    return guide.sample_eigenbasis_blocks(len(indices), noise=noise)


def grid(mode, world_size, sample_groups=None):
    """``(D, S)``: data shards and sample groups of ``world_size`` ranks in ``mode``. For ``"both"``,
    S defaults to the smallest divisor of R with S² ≥ R (R = 4: 2 × 2, R = 8: 2 shards × 4 groups;
    a prime R gives D = 1, i.e. ``"samples"``)."""
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    if sample_groups is not None and mode != "both":
        raise ValueError(f"sample_groups only applies to mode 'both' (mode {mode!r} fixes it)")
    if mode == "samples":
        return 1, world_size
    if mode == "data":
        return world_size, 1
    if sample_groups is None:
        sample_groups = next(s for s in range(1, world_size + 1) if world_size % s == 0 and s * s >= world_size)
    if not (sample_groups >= 1 and world_size % sample_groups == 0):
        raise ValueError(f"sample_groups must divide the world size {world_size}, got {sample_groups}")
    return world_size // sample_groups, sample_groups


class Communicator:
    """Collectives over a ``torch.distributed`` process group (``group=None``: the default group),
    or over this process alone when ``torch.distributed`` is not initialised.

    ``bytes_reduced`` counts the bytes handed to :meth:`all_reduce_sum` (a ring all-reduce sends
    and receives 2(R − 1)/R times that per rank)."""

    def __init__(self, group=None):
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.bytes_reduced = 0

    def all_reduce_sum(self, tensors):
        """Σ over ranks of each of ``tensors`` (one dtype and device), in ONE all-reduce of their
        concatenation; returns new tensors shaped like the inputs."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
        self.bytes_reduced += flat.numel() * flat.element_size()
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    @torch.no_grad()
    def average_(self, tensors):
        """Replace each of ``tensors`` (one dtype and device) by its mean over ranks, in place."""
        for tensor, total in zip(tensors, self.all_reduce_sum(tensors)):
            tensor.copy_(total / self.world_size)

    @torch.no_grad()
    def broadcast_(self, tensors, src=0):
        """Overwrite ``tensors`` on every rank with rank ``src``'s values."""
        if self.world_size > 1:
            for tensor in tensors:
                dist.broadcast(tensor, src, group=self.group)


class ParallelPlan:
    """What this rank contributes to a step and how the contributions are combined (module doc).

    Give it to :class:`~pyro_kfacvi.KFACVI` as ``parallel``: the engine then draws this rank's
    weight samples with :meth:`sample_blocks` and sums its statistics over ranks with
    :meth:`sum_statistics`, so every :meth:`KFACVI.step` (and ``evaluate_loss``) is a collective call.
    ``num_particles`` is M per rank; pass each rank its shard (:meth:`shard`) of the global minibatch.

    :param str mode: ``"samples"``, ``"data"`` or ``"both"``.
    :param int seed: seed of the weight-sample streams (:func:`stream_seed`).
    :param int sample_groups: S for mode ``"both"`` (default: see :func:`grid`).
    :param Communicator communicator: default: over the default process group.
    """

    def __init__(self, mode, seed=0, sample_groups=None, communicator=None):
        self.mode, self.seed = mode, int(seed)
        self.communicator = communicator if communicator is not None else Communicator()
        self.data_shards, self.sample_groups = grid(mode, self.world_size, sample_groups)
        self.data_shard, self.sample_group = divmod(self.rank, self.sample_groups)

    @property
    def rank(self):
        return self.communicator.rank

    @property
    def world_size(self):
        return self.communicator.world_size

    def sample_blocks(self, guide, num_samples, step):
        """This rank's M weight samples: samples s·M … (s+1)·M − 1 of ``step``."""
        first = self.sample_group * num_samples
        return draw_weight_samples(guide, self.seed, step, range(first, first + num_samples))

    def sum_statistics(self, stats):
        """The :class:`~pyro_kfacvi.curvature.Statistics` (sums) of every rank added up: NLL,
        gradients, factors (if computed), the likelihood's statistics and the (sample, example)
        count, in one all-reduce."""
        tensors = stats.tensors()
        total = self.communicator.all_reduce_sum([stats.nll.reshape(1), stats.nll.new_full((1,), stats.count),
                                                  *tensors])
        summed = iter(total[2 + len(stats.grads):])
        factors = None if stats.factors is None else [tuple(next(summed) for _ in fs) for fs in stats.factors]
        return Statistics(total[0][0], total[2:2 + len(stats.grads)], factors, total[1][0], tuple(summed))

    def global_batch_size(self, batch_size, num_examples):
        """D·B, the minibatch that the D data shards of B examples split. A last minibatch of an
        epoch with fewer examples than shards cannot be split: that is an error."""
        size = batch_size * self.data_shards
        if 0 < num_examples % size < self.data_shards:
            raise ValueError(f"the last global minibatch of an epoch holds {num_examples % size} examples, fewer "
                             f"than the {self.data_shards} data shards: change the batch size or the training set")
        return size

    def shard(self, x, y):
        """This rank's contiguous shard of a global minibatch ``(x, y)``: part d of D near-equal parts
        (``torch.tensor_split``; the last minibatch of an epoch may give shards of different sizes)."""
        if x.shape[0] < self.data_shards:
            raise ValueError(f"a minibatch of {x.shape[0]} examples cannot be split into {self.data_shards} shards")
        return x.tensor_split(self.data_shards)[self.data_shard], y.tensor_split(self.data_shards)[self.data_shard]

    def synchronize_(self, *modules):
        """Broadcast rank 0's parameters and buffers of ``modules`` (e.g. network and guide)."""
        self.communicator.broadcast_([t for m in modules for t in (*m.parameters(), *m.buffers())])

    def average_buffers_(self, module):
        """Average the floating-point buffers of ``module`` (BatchNorm running statistics) over ranks.
        The running statistics move linearly with each sample's batch statistics, so in mode
        ``"samples"`` the average is exactly what one process with S·M samples holds."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            self.communicator.average_(buffers)

    def seed_global_rng(self):
        """Seed the global torch RNG from ``(seed, rank)``: the draws still taken from it (the labels
        of ``fisher="mc"``) then differ across ranks."""
        torch.manual_seed(stream_seed(self.seed, self.rank))


# --------------------------------------------------------------------------------------------
def launched_by_torchrun():
    """Whether the environment describes a process group (torchrun sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(device="cpu"):
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT, set by ``torchrun``): NCCL for ``cuda``, Gloo for ``cpu``. Returns
    this process's device: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def payload_bytes(guide, with_curvature=True):
    """``{layer: bytes}`` that one step all-reduces per posterior block: ḡ (d_out·d_in numbers) and,
    at a curvature refresh, A (d_in²) and G (d_out²) — or the diagonal (d) for BatchNorm; plus
    ``"(NLL, count)"``, two scalars per step."""
    def numel(block):
        factors = sum(f.numel() for f in block.curvature.factors()) if with_curvature else 0
        return block.eigenbasis_loc.numel() + factors

    size = guide.blocks[0].eigenbasis_loc.element_size()
    return {**{block.name: numel(block) * size for block in guide.blocks}, "(NLL, count)": 2 * size}
