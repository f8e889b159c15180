"""Equal-budget learning-rate tuning of K-FAC, KFAC-VI and Adam on LeNet5 / CIFAR-10.

Table 1's K-FAC and KFAC-VI hyperparameters under-train the standard LeNet5 (docs/results.md),
so the methods are compared after the same tuning budget each:

* tuning: four runs per method, 15 epochs each on the first 10,000 training images, evaluated
  on the *last 5,000 training images* (``--validation 5000``; the test set is never used),
  one learning rate per run from a ×4 grid that contains the method's default — K-FAC and
  KFAC-VI: the preset's warm-up/polynomial schedule scaled by ``--lr-scale`` 1, 4, 16, 64;
  Adam: ``--lr`` 2.5e-4, 1e-3, 4e-3, 1.6e-2. Every other hyperparameter is the preset's
  (Table 1) or the baseline's default. A run that diverges counts as a failed setting;
* selection: the highest validation accuracy of the final model (S = 10 posterior samples);
* final: one run per method with the selected learning rate on the full protocol (50,000
  training images, 15 epochs, batch 64, S = 50, test set), with ``--final``.

    KFACVI_DATA=../shared/data/cifar10 python examples/lr_sweep.py               # tuning runs
    KFACVI_DATA=../shared/data/cifar10 python examples/lr_sweep.py --final       # + final runs

Runs go to ``runs/sweep/<method>-<value>`` and ``runs/sweep/final-<method>``; finished runs are
reused, so the script can be stopped and started again. The summary is printed as a Markdown
table and written to ``--json`` (default ``docs/results/lr-sweep.json``).
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

TUNING = ["--epochs", "15", "--train-subset", "10000", "--validation", "5000", "--test-samples", "10"]
METHODS = {  # method: (command prefix, option that sets the learning rate, grid)
    "kfac": (["train", "--preset", "lenet5-kfac"], "--lr-scale", [1, 4, 16, 64]),
    "kfacvi": (["train", "--preset", "lenet5-kfacvi", "--mc-samples", "1"], "--lr-scale", [1, 4, 16, 64]),
    "adam": (["baseline", "--method", "adam"], "--lr", [2.5e-4, 1e-3, 4e-3, 1.6e-2]),
}


def run(method, value, out, extra, threads):
    """One ``kfacvi`` run, reused if finished, resumed if interrupted (``train``) and marked as
    diverged by exit code 1; returns its final record, or None if it diverged."""
    metrics, diverged = out / "metrics.json", out / "DIVERGED"
    if diverged.exists():
        return None
    if not metrics.exists() or "final" not in json.loads(metrics.read_text()):
        prefix, option, _ = METHODS[method]
        if prefix[0] == "train" and (out / "checkpoint.pt").exists():
            command = ["kfacvi", "train", "--resume", str(out)]
        else:
            shutil.rmtree(out, ignore_errors=True)
            command = ["kfacvi", *prefix, option, str(value), *extra, "--out", str(out)]
        command += ["--threads", str(threads), "--no-progress"]
        print("$", " ".join(command), flush=True)
        code = subprocess.run(command).returncode
        if code == 1:
            diverged.touch()
            return None
        if code != 0:
            raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return json.loads(metrics.read_text())["final"]


def best(results):
    """The grid value with the highest validation accuracy among the runs that finished."""
    finished = {value: r for value, r in results.items() if r is not None}
    return max(finished, key=lambda value: finished[value]["test_acc"]) if finished else None


def table(summary):
    lines = ["| method | grid value | validation acc | validation NLL | selected |", "|---|---|---|---|---|"]
    for method, entry in summary.items():
        for value, r in entry["tuning"].items():
            acc, nll = ("diverged", "–") if r is None else (f"{100 * r['test_acc']:.2f}%", f"{r['test_nll']:.3f}")
            lines.append(f"| {method} | {value} | {acc} | {nll} | {'✓' if value == entry['selected'] else ''} |")
    for method, entry in summary.items():
        if entry.get("final"):
            f = entry["final"]
            lines.append(f"\n{method} final ({entry['selected']}): test acc {100 * f['test_acc']:.2f}%, "
                         f"NLL {f['test_nll']:.3f}, ECE {f['test_ece']:.3f}, Brier {f['test_brier']:.3f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--final", action="store_true", help="also run each method's selected setting in full")
    parser.add_argument("--runs", default="runs/sweep", help="folder of the runs (default runs/sweep)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--json", default="docs/results/lr-sweep.json", help="summary file")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")

    runs, summary = Path(args.runs), {}
    for method in methods:
        grid = METHODS[method][2]
        tuning = {value: run(method, value, runs / f"{method}-{value}", TUNING, args.threads) for value in grid}
        summary[method] = {"option": METHODS[method][1], "tuning": tuning, "selected": best(tuning)}
    for method in methods if args.final else ():
        selected = summary[method]["selected"]
        if selected is not None:
            summary[method]["final"] = run(method, selected, runs / f"final-{method}", [], args.threads)

    print(table(summary))
    Path(args.json).write_text(json.dumps({"protocol": __doc__, "tuning_options": TUNING, "results": summary},
                                          indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
