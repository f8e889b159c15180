"""Distributed KFAC-VI: two Gloo processes, spawned here, against one process with twice the
weight samples (mode "samples") or twice the minibatch (mode "data"), and the layout, sample
streams and sharding on their own."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal
from pyro_kfacvi.distributed import ParallelPlan, draw_weight_samples, grid, payload_bytes
from pyro_kfacvi.experiments import cli
from pyro_kfacvi.experiments.data import Split
from pyro_kfacvi.experiments.presets import PRESETS
from pyro_kfacvi.experiments.training import Trainer

STEPS, SAMPLES, BATCH, WORLD = 5, 2, 6, 2  # M samples and B examples per rank
#: K-FAC (a point mass): with weight samples, rounding differences of float32 sums can turn the eigenbasis
#: within (nearly) degenerate eigenspaces, which changes the samples drawn with it (docs/distributed.md)
TINY_KFAC = PRESETS["quick-kfac"].replace(channels=(4, 8), hidden=(16, 16), epochs=2, batch_size=12,
                                          train_subset=None, test_samples=2, eval_samples=0, train_eval_size=32,
                                          inverse_every=2, parallel="data")


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_engine(mode, num_samples, seed=3):
    """A float64 tanh MLP under KFAC-VI with momentum and eigenbases refreshed every other step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = BayesianModel(net, Categorical(), prior_variance=1.0, num_data=1000)
    guide = KroneckerNormal(model, rho=0.02, damping=1e-2)
    return KFACVI(model, guide, lr=0.05, momentum=0.9, num_particles=num_samples,
                  curvature=CurvatureConfig(beta=0.5, inverse_every=2), parallel=ParallelPlan(mode, seed))


def run_mlp(mode, num_samples, global_batch):
    """STEPS steps on fixed global minibatches of ``global_batch`` rows, each rank on its shard."""
    engine = mlp_engine(mode, num_samples)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(global_batch, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (global_batch,), generator=g)
        losses.append(engine.step(*engine.parallel.shard(x, y)))
    blocks = engine.guide.blocks
    return {"loc": [b.loc for b in blocks], "A": [b.curvature.A for b in blocks], "G": [b.curvature.G for b in blocks],
            "velocities": engine.velocities, "losses": losses,
            "payload": engine.parallel.communicator.bytes_reduced, "per_step": sum(payload_bytes(engine.guide).values())}


def fake_cifar(n_train=48, n_test=24):
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 3, 32, 32, generator=g)
        return Split(x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long())

    return SimpleNamespace(train=split(n_train), test=split(n_test))


def train_tiny(config, out_dir):
    trainer = Trainer(config, fake_cifar(), out_dir=out_dir, progress=False, log=None)
    trainer.run()
    return {"loc": [b.loc for b in trainer.guide.blocks], "final": trainer.final}


def worker(rank, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {"samples": run_mlp("samples", SAMPLES, BATCH), "data": run_mlp("data", SAMPLES, WORLD * BATCH),
                   "trainer": train_tiny(TINY_KFAC, folder / f"run{rank}")}
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 Gloo ranks ends with, and the folder they ran in."""
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(folder,), nprocs=WORLD)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)], folder


def assert_same_state(ours, reference, atol=1e-10):
    for key in ("loc", "A", "G", "velocities"):
        for a, b in zip(ours[key], reference[key], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert ours["losses"] == pytest.approx(reference["losses"], abs=atol)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, num_samples, global_batch", [
    ("samples", WORLD * SAMPLES, BATCH),  # 2 ranks x M samples = one process with 2M samples
    ("data", SAMPLES, WORLD * BATCH),  # 2 ranks x B examples = one process with a minibatch of 2B
])
def test_two_ranks_match_one_process_with_twice_the_work(two_ranks, mode, num_samples, global_batch):
    ranks, _ = two_ranks
    reference = run_mlp(mode, num_samples, global_batch)
    for rank in ranks:
        assert_same_state(rank[mode], reference)
    assert ranks[0][mode]["loc"][0].abs().sum() > 0 and reference["losses"][0] != reference["losses"][-1]


def test_every_step_all_reduces_gradients_and_factors_once(two_ranks):
    ranks, _ = two_ranks
    per_step = ranks[0]["samples"]["per_step"]
    # Linear(4, 6): W̃ 6x5, A 5x5, G 6x6; Linear(6, 3): W̃ 3x7, A 7x7, G 3x3; NLL and count: 2 float64
    assert per_step == 8 * (30 + 25 + 36 + 21 + 49 + 9 + 2)
    assert all(rank[mode]["payload"] == STEPS * per_step for rank in ranks for mode in ("samples", "data"))


def test_data_parallel_trainer_matches_one_process_and_only_rank_0_writes(two_ranks, tmp_path):
    ranks, folder = two_ranks
    reference = train_tiny(TINY_KFAC.replace(batch_size=WORLD * TINY_KFAC.batch_size), tmp_path / "run")
    for rank in ranks:
        for ours, theirs in zip(rank["trainer"]["loc"], reference["loc"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert rank["trainer"]["final"]["test_acc"] == reference["final"]["test_acc"]
    report = json.loads((folder / "run0" / "metrics.json").read_text())
    assert report["config"]["parallel"] == "data" and len(report["epochs"]) == TINY_KFAC.epochs
    assert report["steps_per_epoch"] == 2  # 48 images in global minibatches of 2 x 12
    assert not (folder / "run1").exists()


# --------------------------------------------------------------------------------------------
def test_grid_of_data_shards_and_sample_groups():
    assert grid("samples", 4) == (1, 4) and grid("data", 4) == (4, 1)
    assert grid("both", 4) == (2, 2) and grid("both", 8) == (2, 4) and grid("both", 6, sample_groups=2) == (3, 2)
    assert grid("both", 2) == (1, 2)  # a prime world size leaves no room for data shards
    with pytest.raises(ValueError, match="divide"):
        grid("both", 6, sample_groups=4)
    with pytest.raises(ValueError, match="only applies"):
        grid("samples", 4, sample_groups=2)
    with pytest.raises(ValueError, match="one of"):
        grid("weights", 2)


def test_sample_i_of_a_step_does_not_depend_on_who_draws_it():
    engine = mlp_engine("samples", 4)
    engine.step(torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))  # non-trivial eigenbases
    guide = engine.guide
    together = draw_weight_samples(guide, seed=3, step=7, indices=range(4))
    parts = [draw_weight_samples(guide, seed=3, step=7, indices=range(2 * r, 2 * r + 2)) for r in range(2)]
    for block, first, second in zip(together, *parts):
        torch.testing.assert_close(block, torch.cat([first, second]), rtol=0, atol=1e-12)  # batched matmuls
    other_step = draw_weight_samples(guide, seed=3, step=8, indices=range(4))
    other_seed = draw_weight_samples(guide, seed=4, step=7, indices=range(4))
    assert not torch.equal(together[0], other_step[0]) and not torch.equal(together[0], other_seed[0])
    assert len({tuple(s.flatten().tolist()) for s in together[0]}) == 4


def test_reparameterized_noise_has_the_guide_covariance():
    guide = mlp_engine("samples", 1).guide
    q = guide.distributions()[1]
    draws = draw_weight_samples(guide, seed=0, step=0, indices=range(20_000))[1]
    expected = q.scale.pow(2)  # the guide's eigenbasis is still the identity: diagonal covariance
    torch.testing.assert_close((draws - q.loc).pow(2).mean(0), expected, rtol=0.05, atol=0)


def test_both_mode_gives_each_rank_a_shard_and_a_sample_group():
    plans = [ParallelPlan("both", seed=3, sample_groups=2, communicator=SimpleNamespace(rank=r, world_size=6))
             for r in range(6)]
    assert [(p.data_shard, p.sample_group) for p in plans] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert plans[0].global_batch_size(4, 1000) == 12
    x = torch.arange(10.0)  # a last minibatch of 10: shards of 4, 3, 3, no padding
    shards = {p.data_shard: p.shard(x, x.long())[0] for p in plans}
    assert [len(shards[d]) for d in range(3)] == [4, 3, 3] and torch.equal(torch.cat([shards[0], shards[1], shards[2]]), x)
    guide = mlp_engine("samples", 1).guide
    everything = draw_weight_samples(guide, seed=3, step=5, indices=range(4))
    for plan in plans[:2]:
        mine = plan.sample_blocks(guide, num_samples=2, step=5)
        torch.testing.assert_close(mine[0], everything[0][2 * plan.sample_group:2 * plan.sample_group + 2],
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fewer than the 3 data shards"):
        plans[0].global_batch_size(4, 10 * 12 + 2)


def test_parallel_is_a_configuration_field_with_a_command_line_flag():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--preset", "quick", "--parallel", "both", "--sample-groups", "2"])
    config = cli.config_from_args(args)
    assert (config.parallel, config.sample_groups) == ("both", 2)
    with pytest.raises(ValueError, match="identical samples on every process"):
        PRESETS["quick-kfac"].replace(parallel="samples")
    with pytest.raises(ValueError, match="needs parallel='both'"):
        PRESETS["quick"].replace(parallel="data", sample_groups=2)
    with pytest.raises(ValueError, match="parallel must be"):
        PRESETS["quick"].replace(parallel="weights")
