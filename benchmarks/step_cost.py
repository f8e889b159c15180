"""Cost of one KFAC-VI step against plain SGD, sequential sampling and Pyro's mean-field SVI.

    python benchmarks/step_cost.py                          # CPU, M = 1, 4, 10, 50 (≈ 5-10 min on 2 cores)
    python benchmarks/step_cost.py --repeats 2 --samples 1,4 --no-memory --predictive-rounds 0   # smoke test
    python benchmarks/step_cost.py --device cuda --json step_cost.json

Workload: LeNet5 on CIFAR-10-*shaped random data* (``torch.randn`` images of 3×32×32, uniform
random labels over 10 classes; no real data is loaded, which does not change the cost of a
step), minibatch 64, N = 50,000 for the likelihood scale, prior variance 1.

Candidates (each owns its own freshly initialised network, model and guide, same seed):

* ``sgd``: forward + cross-entropy backward + ``torch.optim.SGD`` (momentum 0.9) update of a
  plain LeNet5 — the floor;
* ``kfacvi{M}``: ``KFACVI(..., lr=1e-4, momentum=0.9, num_particles=M).step(x, y)`` with a
  ``KroneckerNormal(rho=6e-5, damping=1e-3)`` (``split_damping=True`` with ``--split-damping``,
  as in the presets) and a ``CurvatureConfig`` with ``curvature_every=K`` (``--curvature-every``,
  default 1: factors every step, as in the paper's setting), ``inverse_every``
  (``--inverse-every``, default max(10, K)), ``kfac_approx`` (``--kfac-approx``, default
  ``"expand"``, the paper's) and the default ``chunk_size`` — the M samples run batched through
  the network. With K > 1 one timed call is K consecutive steps (exactly one of which refreshes
  the curvature) and its time is divided by K: the median is then the *amortised* cost per step,
  not the cost of the cheap steps alone. Every other candidate is then timed in calls of K steps too (as in
  ``compare_revisions.py``): interference makes step times right-skewed, so the median of single
  steps sits below the median of K-step averages of the same steps, and a ratio of the two would
  favour the candidate timed step by step;
* ``sequential{M}``: the same engine doing the same step with the M samples drawn and pushed
  through the network *one at a time*, torchsso-style: M calls of
  ``engine.statistics(x, y, guide.sample_eigenbasis_blocks(1), with_curvature)`` whose NLL, gradients and
  Kronecker factors are summed and averaged, followed by exactly the rest of ``KFACVI.step``
  (finite check, curvature EMA, eigenbasis refresh every ``inverse_every`` steps, update).
  This was chosen over ``CurvatureConfig(chunk_size=1)`` because it also draws the samples one at a time;
* ``floor{M}`` and ``accumulated{M}``: the ``sgd`` step on M·64 images (M copies of the batch),
  as one batch and as M forward and backward passes of the 64 images accumulating the gradient
  before one update. The faster of the two is the physical floor of M weight samples: the
  forward and backward cost of M×64 images, with no sampling and no curvature (on a CPU one
  batch of 3,200 images ran at two thirds of the speed per image of 50 batches of 64, whose
  activations stay in cache);
* ``pyro_svi{M}``: ``pyro.infer.SVI`` with ``AutoNormal`` (mean-field) on the same
  ``BayesianModel``, ``Trace_ELBO(num_particles=M, vectorize_particles=True,
  max_plate_nesting=1)`` and ``pyro.optim.Adam(lr=1e-3)`` — what a Pyro user would pick instead
  (Pyro's default validation left on, as a user would have it).

Timing: all candidates live in ONE process. Each first runs ``--warmup`` untimed calls (a call
is one step, or K with ``--curvature-every K``); the fastest warm-up call fixes how many
consecutive calls it runs per round (about ``--round-seconds`` worth, at least one), so cheap
candidates get more samples. Then ``--repeats`` rounds go round-robin over the candidates,
starting each round at a different candidate so none is always first after another's
cache-heavy step. Every call is timed on its own (``perf_counter``, with
``torch.cuda.synchronize`` around it on CUDA) and divided by its steps. Reported: the median
ms/step (robust to other load on the machine) and the mean (which includes the amortised
eigendecomposition of every 10th KFAC-VI step that the median hides). On a shared machine whose
neighbours slow steps down now and then (the medians of two identical runs then differ by up to
±0.1 in the ratios) the ratios of the 10th percentiles are printed too (``ratios_p10`` in the
JSON): interference only adds time, so the fast tail is the least disturbed estimate.

Peak memory: per candidate and M, in a fresh subprocess (so one run's high-water mark cannot
leak into another), over 2 steps after 1 untimed one: on CPU the peak RSS (VmHWM of
``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the warm-up step; not
``ru_maxrss``, which in a subprocess also counts the parent's RSS at fork) minus the RSS
just before the steps, with glibc's mmap threshold fixed at 128 KiB so that freed tensors are
returned to the OS rather than silently reused; on CUDA ``torch.cuda.max_memory_allocated``
minus the memory allocated before them. This is the transient memory of a step (activations,
patches, gradients); the persistent state (guide, curvature, optimiser) is not included.

Predictive: ``Predictive(model, guide, 50)`` over 10,000 test-shaped random images against a
Python loop of 50 ``Predictive(model, guide, 1)`` calls, each one pass over the 10,000 images
(averaging the 50 softmaxes), interleaved for ``--predictive-rounds`` rounds; images/second
counts each image once (with all of its 50 samples). ``--predictive-pass 128x8`` sets the rows
and samples of one batched pass (default: ``Predictive``'s). The minor page faults of each run
(``ru_minflt``: memory the allocator had handed back to the system and touches again) are
reported per 1,000 images.
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_kfacvi import KFACVI, BayesianModel, Categorical, CurvatureConfig, KroneckerNormal, Predictive
from pyro_kfacvi.curvature import KFAC_APPROXIMATIONS, Statistics
from pyro_kfacvi.experiments.models import LeNet5

BATCH, IMAGE_SHAPE, NUM_CLASSES = 64, (3, 32, 32), 10
NUM_DATA, PRIOR_VARIANCE = 50_000, 1.0
RHO, DAMPING, LR, MOMENTUM = 6e-5, 1e-3, 1e-4, 0.9
PREDICTIVE_SAMPLES = 50
MEMORY_STEPS = 2
MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's default is dynamic, up to 32 MiB


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device):
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# candidates: each is a zero-argument callable doing one training step on a fixed batch


def random_batch(device, size=BATCH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *IMAGE_SHAPE, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return x.to(device), y.to(device)


def fresh_model(device):
    torch.manual_seed(0)
    return BayesianModel(LeNet5().to(device), Categorical(), PRIOR_VARIANCE, NUM_DATA)


@dataclass(frozen=True)
class EngineSettings:
    """How the KFAC-VI candidates are configured (``--curvature-every``, ``--inverse-every``,
    ``--split-damping``, ``--kfac-approx``)."""

    curvature_every: int = 1
    inverse_every: int = 10
    split_damping: bool = False
    kfac_approx: str = "expand"

    @classmethod
    def from_args(cls, args):
        inverse_every = args.inverse_every or max(10, args.curvature_every)
        return cls(args.curvature_every, inverse_every, args.split_damping, args.kfac_approx)

    def flags(self):
        return ["--curvature-every", str(self.curvature_every), "--inverse-every", str(self.inverse_every),
                "--kfac-approx", self.kfac_approx, *(["--split-damping"] if self.split_damping else [])]


def kfacvi_engine(device, num_particles, settings=EngineSettings()):
    model = fresh_model(device)
    guide = KroneckerNormal(model, rho=RHO, damping=DAMPING, split_damping=settings.split_damping).to(device)
    curvature = CurvatureConfig(curvature_every=settings.curvature_every, inverse_every=settings.inverse_every,
                                kfac_approx=settings.kfac_approx)
    return KFACVI(model, guide, lr=LR, momentum=MOMENTUM, num_particles=num_particles, curvature=curvature)


def floor_step_fn(device, x, y, num_samples):
    return sgd_step_fn(device, x.repeat(num_samples, 1, 1, 1), y.repeat(num_samples))


def accumulated_step_fn(device, x, y, num_samples):
    return sgd_step_fn(device, x, y, micro_batches=num_samples)


def sgd_step_fn(device, x, y, micro_batches=1, memory_format=torch.contiguous_format):
    """SGD on ``micro_batches`` copies of ``(x, y)``: one forward and backward pass per copy, their
    gradients summed, one update (the cost does not depend on how the gradients are scaled); the
    network's weights in ``memory_format`` (``benchmarks/memory_format.py``)."""
    torch.manual_seed(0)
    net = LeNet5().to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        optimizer.zero_grad()
        for _ in range(micro_batches):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
        optimizer.step()
        return loss.item()

    return step


def kfacvi_step_fn(device, x, y, num_samples, settings):
    engine = kfacvi_engine(device, num_samples, settings)
    return lambda: engine.step(x, y)


def add_statistics(total, part):
    """Sum of two :class:`Statistics` (``total`` may be None), counts included."""
    if total is None:
        return part
    factors = None
    if part.factors is not None:
        factors = [tuple(a + b for a, b in zip(fa, fb)) for fa, fb in zip(total.factors, part.factors)]
    return Statistics(total.nll + part.nll, [a + b for a, b in zip(total.grads, part.grads)], factors,
                      total.count + part.count)


def sequential_step(engine, x, y, num_samples):
    """``engine.step(x, y)`` with its M samples drawn and run through the network one at a time:
    M single-sample :meth:`KFACVI.statistics` calls (each averaged over the batch), averaged over
    M, then the same finite check, curvature update (eq. 9 and the eigenbases every
    ``inverse_every`` steps) and :meth:`KFACVI.apply` as the batched step.
    """
    engine.model.check_batch(x, y)
    engine.model.train()
    with_curvature = engine.iteration % engine.curvature.curvature_every == 0
    total = None
    for _ in range(num_samples):  # each of count 1 (means over the batch): the sum has count M
        total = add_statistics(total, engine.statistics(x, y, engine.guide.sample_eigenbasis_blocks(1), with_curvature))
    stats = total.means_()
    finite, loss = stats.all_finite(stats.nll + engine.guide.complexity())
    if not finite:
        raise FloatingPointError(f"non-finite loss, gradient or curvature at iteration {engine.iteration}")
    refresh = engine.iteration % engine.curvature.inverse_every == 0
    engine.apply(stats, engine.guide.curvature_update(stats.factors, engine.curvature.beta, refresh,
                                                      engine.curvature.track_eigenvalues))
    return loss


def sequential_step_fn(device, x, y, num_samples, settings):
    engine = kfacvi_engine(device, num_samples, settings)
    return lambda: sequential_step(engine, x, y, num_samples)


def pyro_svi_step_fn(device, x, y, num_samples):
    model = fresh_model(device)
    guide = AutoNormal(model)
    guide._pyro_name = f"AutoNormal_M{num_samples}"  # own parameter-store names per candidate
    elbo = Trace_ELBO(num_particles=num_samples, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    return lambda: svi.step(x, y)


def make_step_fn(kind, num_samples, device, x, y, settings=EngineSettings()):
    """One call of a candidate: ``settings.curvature_every`` consecutive steps, whatever the candidate
    (:func:`single_step_fn`), so that every median is one of averages over the same number of steps."""
    step, steps = single_step_fn(kind, num_samples, device, x, y, settings), settings.curvature_every
    return step if steps == 1 else lambda: [step() for _ in range(steps)]


def single_step_fn(kind, num_samples, device, x, y, settings):
    if kind == "sgd":
        return sgd_step_fn(device, x, y)
    baselines = {"pyro_svi": pyro_svi_step_fn, "floor": floor_step_fn, "accumulated": accumulated_step_fn}
    if kind in baselines:
        return baselines[kind](device, x, y, num_samples)
    builders = {"kfacvi": kfacvi_step_fn, "sequential": sequential_step_fn}
    return builders[kind](device, x, y, num_samples, settings)


def candidate_name(kind, num_samples):
    return kind if kind == "sgd" else f"{kind}{num_samples}"


def candidate_list(sample_counts):
    """(kind, M) pairs: SGD, KFAC-VI M=1 (always: the ratios need it), then per M the
    multi-sample candidates (sequential, floor and accumulated at M = 1 are KFAC-VI M=1 and SGD, left out)."""
    pairs = [("sgd", 1), ("kfacvi", 1)]
    for m in sample_counts:
        pairs += [("kfacvi", m), ("sequential", m), ("floor", m), ("accumulated", m)] if m > 1 else []
        pairs.append(("pyro_svi", m))
    return pairs


# ---------------------------------------------------------------------------------------------
# interleaved timing


@dataclass
class Candidate:
    name: str
    step: callable
    steps_per_call: int = 1
    steps_per_round: int = 1
    times: list = field(default_factory=list)


def timed_steps(step, count, device, steps_per_call=1):
    """Wall seconds per step of each of ``count`` consecutive calls of ``step``."""
    times = []
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps_per_call)
    return times


def tenth_percentile(times):
    return statistics.quantiles(times, n=10)[0] if len(times) > 1 else times[0]


def measure_steps(candidates, rounds, warmup, round_seconds, device):
    """Warm up every candidate, then run ``rounds`` round-robin rounds (rotating the start)."""
    for c in candidates:
        fastest = min(timed_steps(c.step, max(1, warmup), device, c.steps_per_call)) * c.steps_per_call
        c.steps_per_round = max(1, round(round_seconds / fastest))
        print(f"  warm-up {c.name:<14} {1000 * fastest:9.1f} ms/step -> {c.steps_per_round} step(s)/round", flush=True)
    for r in range(rounds):
        start = time.perf_counter()
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            c.times += timed_steps(c.step, c.steps_per_round, device, c.steps_per_call)
        print(f"  round {r + 1}/{rounds} ({time.perf_counter() - start:.1f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh subprocess per candidate


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """The RSS high-water mark of this process's memory (VmHWM). Not ``ru_maxrss``: that also
    counts the memory of the process before its ``exec``, i.e. the parent's RSS when forked."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak_rss():
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:  # then the peak may be an earlier, higher one: an upper bound
        print(f"warning: cannot reset the RSS high-water mark ({error}); peak is an upper bound", file=sys.stderr)


def memory_probe(kind, num_samples, device, settings):
    """Run in a fresh process: peak memory increase (MB) over MEMORY_STEPS steps of one candidate.

    One untimed step first, so that lazily loaded library code and one-off allocations are not
    counted; the high-water mark is then reset and the baseline is the memory in use just before
    the measured steps. On CPU the subprocess runs with a fixed glibc mmap threshold, so freed
    tensors go back to the OS and the warm-up step's memory cannot be silently reused."""
    x, y = random_batch(device)
    return peak_step_memory(make_step_fn(kind, num_samples, device, x, y, settings), device)


def peak_step_memory(step, device):
    """The peak memory increase (MB) over MEMORY_STEPS calls of ``step`` after an untimed one
    (:func:`memory_probe`'s measurement, for any zero-argument step)."""
    timed_steps(step, 1, device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed_steps(step, MEMORY_STEPS, device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    reset_peak_rss()
    baseline = current_rss_bytes()
    timed_steps(step, MEMORY_STEPS, device)
    return (peak_rss_bytes() - baseline) / 2**20


def measure_memory(pairs, args):
    """{candidate name: peak MB}, each from its own subprocess of this script."""
    result = {}
    for kind, m in pairs:
        command = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                   "--memory-probe", f"{kind}:{m}", *EngineSettings.from_args(args).flags()]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        name = candidate_name(kind, m)
        probe = subprocess.run(command, capture_output=True, text=True, env=env)
        if probe.returncode != 0:
            print(f"  {name:<14} probe failed:\n{probe.stderr[-2000:]}", flush=True)
            continue
        result[name] = json.loads(probe.stdout.strip().splitlines()[-1])["peak_mb"]
        print(f"  {name:<14} {result[name]:9.1f} MB", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# predictive


def measure_predictive(engine, rounds, test_size, device, pass_shape=(None, None)):
    """Median seconds and minor page faults per full predictive (S = 50 over ``test_size``
    images): batched, with ``pass_shape = (rows, samples)``, vs a loop over samples."""
    x_test, _ = random_batch(device, test_size, seed=1)
    model, guide = engine.model, engine.guide
    rows, samples = pass_shape
    batched = Predictive(model, guide, PREDICTIVE_SAMPLES, chunk_size=samples, batch_size=rows)

    def looped():
        single = Predictive(model, guide, 1)
        return sum(single(x_test) for _ in range(PREDICTIVE_SAMPLES)) / PREDICTIVE_SAMPLES

    runs = {"batched": lambda: batched(x_test), "loop": looped}
    times, faults = {name: [] for name in runs}, {name: [] for name in runs}
    batched(x_test[:1000])  # warm-up on one data batch
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name] += timed_steps(runs[name], 1, device)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(f"  round {r + 1}/{rounds}: batched {times['batched'][-1]:.2f} s, loop {times['loop'][-1]:.2f} s",
              flush=True)
    return {name: (statistics.median(times[name]), statistics.median(faults[name])) for name in runs}


# ---------------------------------------------------------------------------------------------
# report


def ratios_and_table(step_ms, sample_counts):
    """The ratios of the JSON output and one table row per M."""
    ratios = {"kfacvi1_over_sgd": step_ms["kfacvi1"] / step_ms["sgd"]}
    rows = []
    for m in sample_counts:
        k = step_ms[f"kfacvi{m}"]
        row = {"M": m, "over_pyro": k / step_ms[f"pyro_svi{m}"]}
        ratios[f"kfacvi{m}_over_pyro_svi{m}"] = row["over_pyro"]
        if m > 1:
            row["over_m_kfacvi1"] = k / (m * step_ms["kfacvi1"])
            row["over_sequential"] = k / step_ms[f"sequential{m}"]
            row["over_floor"] = k / min(step_ms[f"floor{m}"], step_ms[f"accumulated{m}"])
            ratios[f"kfacvi{m}_over_floor{m}"] = row["over_floor"]
            ratios[f"kfacvi{m}_over_{m}x_kfacvi1"] = row["over_m_kfacvi1"]
            ratios[f"kfacvi{m}_over_sequential{m}"] = row["over_sequential"]
        rows.append(row)
    return ratios, rows


def fmt(value, spec):
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def print_report(candidates, step_ms, ratios, rows, memory, predictive):
    print("\nstep cost (ms/step)")
    print(f"  {'candidate':<14} {'median':>9} {'mean':>9} {'steps':>6} {'peak MB':>9}")
    for c in candidates:
        print(f"  {c.name:<14} {step_ms[c.name]:9.1f} {1000 * statistics.fmean(c.times):9.1f} "
              f"{len(c.times) * c.steps_per_call:6d} {fmt(memory.get(c.name), '9.1f')}")
    print(f"\nKFAC-VI(1) / SGD = {ratios['kfacvi1_over_sgd']:.2f}")
    print(f"  {'M':>3} {'KFAC-VI(M)/(M·KFAC-VI(1))':>26} {'KFAC-VI(M)/seq(M)':>18} {'KFAC-VI(M)/PyroSVI(M)':>22} "
          f"{'KFAC-VI(M)/floor(M)':>20} {'peak MB KFAC-VI(M)':>19}")
    for row in rows:
        m = row["M"]
        print(f"  {m:3d} {fmt(row.get('over_m_kfacvi1'), '26.3f')} {fmt(row.get('over_sequential'), '18.3f')} "
              f"{row['over_pyro']:22.3f} {fmt(row.get('over_floor'), '20.3f')} {fmt(memory.get(f'kfacvi{m}'), '19.1f')}")
    if predictive:
        print(f"\npredictive, S = {PREDICTIVE_SAMPLES} over {predictive['test_images']} images:")
        for name in ("batched", "loop"):
            print(f"  {name:<8} {predictive[name + '_s']:8.2f} s  {predictive[name + '_images_per_s']:9.0f} images/s  "
                  f"{predictive[name + '_page_faults_per_1000_images']:9.0f} page faults per 1,000 images")
        print(f"  batched speed-up over the loop: {predictive['loop_s'] / predictive['batched_s']:.2f}x")


# ---------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--repeats", type=int, default=25, help="round-robin rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate (default 2)")
    parser.add_argument("--round-seconds", type=float, default=0.3,
                        help="target time of one candidate's turn in a round (default 0.3)")
    parser.add_argument("--samples", default="1,4,10,50", help="comma-separated M values (default 1,4,10,50)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--predictive-rounds", type=int, default=2, help="0 skips the predictive (default 2)")
    parser.add_argument("--test-size", type=int, default=10_000, help="predictive test images (default 10000)")
    parser.add_argument("--predictive-pass", metavar="ROWSxSAMPLES",
                        help="rows and samples of one batched predictive pass, e.g. 128x8 (default: Predictive's)")
    parser.add_argument("--curvature-every", type=int, default=1, metavar="K",
                        help="KFAC-VI curvature refresh every K steps, timed per K-step cycle (default 1)")
    parser.add_argument("--inverse-every", type=int, metavar="K2",
                        help="KFAC-VI eigendecompositions every K2 steps (default max(10, K))")
    parser.add_argument("--split-damping", action="store_true",
                        help="KFAC-VI with split_damping=True (the presets' choice: damped factors (A + π√γ I) ⊗ "
                             "(G + √γ/π I) instead of A ⊗ G + γI)")
    parser.add_argument("--kfac-approx", choices=KFAC_APPROXIMATIONS, default="expand",
                        help="Kronecker factors of the convolutions: 'expand' (KFC, the paper's; default) or "
                             "'reduce' (Eschenhagen et al. 2023, one outer product per image instead of per position)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: "kind:M", run in a subprocess
    return parser.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_probe:
        kind, m = args.memory_probe.split(":")
        print(json.dumps({"peak_mb": memory_probe(kind, int(m), device, EngineSettings.from_args(args))}))
        return

    sample_counts = sorted({int(s) for s in args.samples.split(",")})
    info = machine_info(device)
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print(f"workload: LeNet5, random CIFAR-10-shaped data (batch {BATCH}, {'x'.join(map(str, IMAGE_SHAPE))}, "
          f"{NUM_CLASSES} classes), M in {sample_counts}, {args.repeats} rounds after {args.warmup} warm-up steps, "
          f"KFAC-VI {EngineSettings.from_args(args)}\n")

    x, y = random_batch(device)
    pairs = candidate_list(sample_counts)
    settings = EngineSettings.from_args(args)
    every = settings.curvature_every
    candidates = [Candidate(candidate_name(k, m), make_step_fn(k, m, device, x, y, settings), every)
                  for k, m in pairs]
    print("timing")
    measure_steps(candidates, args.repeats, args.warmup, args.round_seconds, device)
    step_ms = {c.name: 1000 * statistics.median(c.times) for c in candidates}
    step_ms_p10 = {c.name: 1000 * tenth_percentile(c.times) for c in candidates}

    memory = {}
    if not args.no_memory:
        print("peak memory (fresh subprocess each)")
        memory = measure_memory(pairs, args)

    predictive = None
    if args.predictive_rounds > 0:
        print("predictive")
        engine = kfacvi_engine(device, 1)
        for _ in range(3):  # a few steps so the guide has curvature and a non-trivial covariance
            engine.step(x, y)
        pass_shape = tuple(map(int, args.predictive_pass.split("x"))) if args.predictive_pass else (None, None)
        measured = measure_predictive(engine, args.predictive_rounds, args.test_size, device, pass_shape)
        predictive = {"test_images": args.test_size, "samples": PREDICTIVE_SAMPLES, "pass_rows_samples": pass_shape,
                      **{f"{k}_s": s for k, (s, _) in measured.items()},
                      **{f"{k}_images_per_s": args.test_size / s for k, (s, _) in measured.items()},
                      **{f"{k}_page_faults_per_1000_images": 1000 * f / args.test_size
                         for k, (_, f) in measured.items()}}

    ratios, rows = ratios_and_table(step_ms, sample_counts)
    ratios_p10, _ = ratios_and_table(step_ms_p10, sample_counts)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print_report(candidates, step_ms, ratios, rows, memory, predictive)
    print("\nthe same ratios from the 10th percentiles of the step times (the least disturbed steps):")
    print("  " + ", ".join(f"{name} {value:.3f}" for name, value in ratios_p10.items()))
    if args.json:
        result = {
            "ratios": ratios,
            "ratios_p10": ratios_p10,
            "peak_memory_mb": {str(m): memory[f"kfacvi{m}"] for m in sample_counts if f"kfacvi{m}" in memory},
            "peak_memory_mb_by_candidate": memory,
            "step_ms": step_ms,
            "step_ms_mean": {c.name: 1000 * statistics.fmean(c.times) for c in candidates},
            "step_ms_p10": step_ms_p10,
            "steps_timed": {c.name: len(c.times) * c.steps_per_call for c in candidates},
            "predictive": predictive,
            "device": info.get("gpu", "cpu") if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "machine": info,
            "settings": {"batch": BATCH, "samples": sample_counts, "repeats": args.repeats, "warmup": args.warmup,
                         "round_seconds": args.round_seconds, "curvature_every": settings.curvature_every,
                         "inverse_every": settings.inverse_every, "split_damping": settings.split_damping,
                         "kfac_approx": settings.kfac_approx,
                         "data": "random tensors (torch.randn / randint)",
                         "sequential": "M x engine.statistics(sample_eigenbasis_blocks(1)) + one update"},
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
