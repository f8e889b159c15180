"""Equal-budget tuning of K-FAC, KFAC-VI, Adam and the peers on LeNet5 / CIFAR-10, selected on a validation split.

Table 1's K-FAC and KFAC-VI hyperparameters under-train the standard LeNet5 (docs/results.md),
so the methods are compared after the same tuning budget each. Three sweeps:

``--sweep lr`` (learning rate only, on a small subset):

* tuning: four runs per method, 15 epochs each on the first 10,000 training images, evaluated
  on the *last 5,000 training images* (``--validation 5000``; the test set is never used),
  one learning rate per run from a ×4 grid that contains the method's default — K-FAC and
  KFAC-VI: the preset's warm-up/polynomial schedule scaled by ``--lr-scale`` 1, 4, 16, 64;
  Adam: ``--lr`` 2.5e-4, 1e-3, 4e-3, 1.6e-2. Every other hyperparameter is the preset's
  (Table 1) or the baseline's default.

``--sweep damping`` (damping and learning rate together, on the whole training split):

* tuning: five runs per method, 15 epochs each on the first 45,000 training images, evaluated
  on the last 5,000 (``--validation 5000``). K-FAC and KFAC-VI (M = 1): (γ, lr × …) in
  (1e-3, 16), (1e-3, 64), (1e-2, 64), (1e-2, 256), (1e-1, 1024) — each γ with learning rates it
  can take (the larger γ, the smaller the preconditioned step); Adam: lr 2.5e-4, 5e-4, 1e-3,
  2e-3, 4e-3. Everything else as in the ``lr`` sweep. ``--methods kfacvi-wide`` runs the same
  (γ, lr) grid for KFAC-VI with ρ² = 1/N (what was called Noisy K-FAC before the ELBO-exact fix).

``--sweep peers`` (the peers and the ELBO-exact mode, same split and budget as ``damping``):

* five runs per method on the first 45,000 training images, validated on the last 5,000, one
  hyperparameter each — the one that defines the method — on a grid around its default. IVON:
  lr 0.05, 0.1, 0.2, 0.4, 0.8 (its authors' CIFAR-10 settings otherwise); MC dropout: dropout
  rate 0.05, 0.1, 0.25, 0.4, 0.5 (Adam, lr 1e-3); mean-field SVI: Adam's lr grid; Noisy K-FAC
  (ELBO-exact, ``--optimizer noisy-kfac`` on the ``lenet5-kfacvi-tuned`` preset, M = 1): prior
  variance η 1e-3, 3e-3, 1e-2, 3e-2, 0.1 (η = 1 diverges, docs/results.md).

Every sweep: a run that diverges counts as a failed setting; the selection is the highest
validation accuracy of the final model (S = 10 posterior samples); ``--final`` then runs each
method's selected setting on the full protocol (50,000 training images, 15 epochs, batch 64,
S = 50, test set), once per ``--seeds`` seed.

    KFACVI_DATA=../shared/data/cifar10 python examples/tune.py --sweep lr --final
    KFACVI_DATA=../shared/data/cifar10 python examples/tune.py --sweep damping --final --parallel 2
    KFACVI_DATA=../shared/data/cifar10 python examples/tune.py --sweep peers --final --seeds 0,1,2 --parallel 2

Runs go to ``runs/<sweep>-sweep/<method>-<setting>`` and ``.../final-<method>[-s<seed>]``; finished runs
are reused, so the script can be stopped and started again. The summary is printed as a Markdown
table and written to ``--json`` (default ``docs/results/<sweep>-sweep.json``).
"""
import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KFAC = ["train", "--preset", "lenet5-kfac"]
KFACVI = ["train", "--preset", "lenet5-kfacvi", "--mc-samples", "1"]
#: KFAC-VI with ρ² = 1/N and γ inside Σ (labelled "Noisy K-FAC" before the ELBO-exact fix; docs/results.md)
KFACVI_WIDE = KFACVI + ["--rho", "4.472136e-3"]
ADAM = ["baseline", "--method", "adam"]
#: the ELBO-exact mode on the tuned preset (the damping sweep's γ 0.1 and lr × 1024, the cheap schedule)
TUNED_NOISY_KFAC = ["train", "--preset", "lenet5-kfacvi-tuned", "--mc-samples", "1", "--optimizer", "noisy-kfac"]
VALIDATION = ["--epochs", "15", "--validation", "5000", "--test-samples", "10"]


def settings(option, values):
    return [[option, str(v)] for v in values]


DAMPING_LR = [["--damping", g, "--lr-scale", s]
              for g, s in (("1e-3", "16"), ("1e-3", "64"), ("1e-2", "64"), ("1e-2", "256"), ("1e-1", "1024"))]
#: sweep: (options of every tuning run, {method: (command prefix, grid of option lists)})
SWEEPS = {
    "lr": (VALIDATION + ["--train-subset", "10000"], {
        "kfac": (KFAC, settings("--lr-scale", [1, 4, 16, 64])),
        "kfacvi": (KFACVI, settings("--lr-scale", [1, 4, 16, 64])),
        "adam": (ADAM, settings("--lr", [2.5e-4, 1e-3, 4e-3, 1.6e-2])),
    }),
    "damping": (VALIDATION, {
        "kfac": (KFAC, DAMPING_LR),
        "kfacvi": (KFACVI, DAMPING_LR),
        "kfacvi-wide": (KFACVI_WIDE, DAMPING_LR),
        "adam": (ADAM, settings("--lr", [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])),
    }),
    "peers": (VALIDATION, {
        "ivon": (["baseline", "--method", "ivon"], settings("--lr", [0.05, 0.1, 0.2, 0.4, 0.8])),
        "mc-dropout": (["baseline", "--method", "mc-dropout"], settings("--dropout", [0.05, 0.1, 0.25, 0.4, 0.5])),
        "mean-field": (["baseline", "--method", "mean-field"], settings("--lr", [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])),
        "noisy-kfac": (TUNED_NOISY_KFAC, settings("--prior-variance", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1])),
    }),
}


def label(options):
    """``["--damping", "1e-2", "--lr-scale", "256"]`` → ``"damping 1e-2, lr-scale 256"``."""
    return ", ".join(f"{options[i].lstrip('-')} {options[i + 1]}" for i in range(0, len(options), 2))


def run(prefix, options, out, extra, threads):
    """One ``kfacvi`` run, reused if finished, resumed if interrupted (``train``) and marked as
    diverged by exit code 1; returns its final record, or None if it diverged."""
    metrics, diverged = out / "metrics.json", out / "DIVERGED"
    if diverged.exists():
        return None
    if not metrics.exists() or "final" not in json.loads(metrics.read_text()):
        if prefix[0] == "train" and (out / "checkpoint.pt").exists():
            command = ["kfacvi", "train", "--resume", str(out)]
        else:
            shutil.rmtree(out, ignore_errors=True)
            command = ["kfacvi", *prefix, *options, *extra, "--out", str(out)]
        command += ["--threads", str(threads), "--no-progress"]
        print("$", " ".join(command), flush=True)
        code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
        if code == 1:
            diverged.touch()
            return None
        if code != 0:
            raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return json.loads(metrics.read_text())["final"]


def best(results):
    """The setting with the highest validation accuracy among the runs that finished."""
    finished = {setting: r for setting, r in results.items() if r is not None}
    return max(finished, key=lambda setting: finished[setting]["test_acc"]) if finished else None


def table(summary):
    lines = ["| method | setting | validation acc | validation NLL | selected |", "|---|---|---|---|---|"]
    for method, entry in summary.items():
        for setting, r in entry["tuning"].items():
            acc, nll = ("diverged", "–") if r is None else (f"{100 * r['test_acc']:.2f}%", f"{r['test_nll']:.3f}")
            lines.append(f"| {method} | {setting} | {acc} | {nll} | {'✓' if setting == entry['selected'] else ''} |")
    for method, entry in summary.items():
        if entry.get("final"):
            f = entry["final"]
            lines.append(f"\n{method} final ({entry['selected']}): test acc {100 * f['test_acc']:.2f}%, "
                         f"NLL {f['test_nll']:.3f}, ECE {f['test_ece']:.3f}, Brier {f['test_brier']:.3f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=SWEEPS, default="lr")
    parser.add_argument("--methods", help="comma-separated subset of the sweep's methods (default: all but "
                                          "the damping sweep's kfacvi-wide)")
    parser.add_argument("--final", action="store_true", help="also run each method's selected setting in full")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds of the final runs "
                                                      "(default 0; seed 0 goes to final-<method>, seed N to "
                                                      "final-<method>-sN)")
    parser.add_argument("--runs", help="folder of the runs (default runs/<sweep>-sweep)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1; 2 with --threads 1 "
                                                                "fills 2 cores without oversubscription)")
    parser.add_argument("--json", help="summary file (default docs/results/<sweep>-sweep.json)")
    args = parser.parse_args()
    tuning_options, grids = SWEEPS[args.sweep]
    methods = args.methods.split(",") if args.methods else [m for m in grids if m != "kfacvi-wide"]
    unknown = set(methods) - set(grids)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(grids)}")
    runs = Path(args.runs or f"runs/{args.sweep}-sweep")

    def folder(method, options):
        return runs / f"{method}-{label(options).replace(', ', '-').replace(' ', '')}"

    jobs = [(m, tuple(o)) for m in methods for o in grids[m][1]]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(
            lambda job: run(grids[job[0]][0], list(job[1]), folder(*job), tuning_options, args.threads), jobs)))
    summary = {}
    for method in methods:
        tuning = {label(options): results[(method, tuple(options))] for options in grids[method][1]}
        summary[method] = {"tuning": tuning, "selected": best(tuning)}
    finals = [m for m in methods if args.final and summary[m]["selected"] is not None]
    chosen = {m: next(o for o in grids[m][1] if label(o) == summary[m]["selected"]) for m in finals}
    seeds = [int(s) for s in args.seeds.split(",")]
    final_jobs = [(m, seed) for seed in seeds for m in finals]

    def final(job):
        method, seed = job
        out = runs / (f"final-{method}" if seed == 0 else f"final-{method}-s{seed}")
        return run(grids[method][0], chosen[method], out, ["--seed", str(seed)], args.threads)

    with ThreadPoolExecutor(args.parallel) as pool:
        for (method, seed), record in zip(final_jobs, pool.map(final, final_jobs)):
            summary[method].setdefault("finals", {})[str(seed)] = record
            if seed == seeds[0]:
                summary[method]["final"] = record

    print(table(summary))
    out = Path(args.json or f"docs/results/{args.sweep}-sweep.json")
    out.write_text(json.dumps({"sweep": args.sweep, "protocol": __doc__, "tuning_options": tuning_options,
                               "results": summary}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
