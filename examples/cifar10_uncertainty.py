"""The whole LeNet5 uncertainty comparison on CIFAR-10: train what is missing, analyse every run,
print the markdown table of docs/results.md and draw the side-by-side figure.

Runs (folders under ``--runs``; each is trained first if it has no checkpoint, with the command
in ``RUNS``, which takes 5 minutes to several hours on 2 CPU cores — see docs/results.md):

    K-FAC, KFAC-VI with M = 1 / 10 / 50 weight samples per step, Adam, SGD, MC dropout and
    Pyro's mean-field SVI, all the standard LeNet5 for 15 epochs with batch 64.

Then ``kfacvi analyze`` on each (skipped where ``ANALYSIS/NAME/report.json`` exists: a run whose
report is there needs no checkpoint) and

* a markdown table: test accuracy, NLL, ECE, Brier, ECE and accuracy averaged over the 25
  corruption/severity pairs, and OOD AUROC (mean over the OOD sets) of the predictive entropy and
  of the mutual information;
* ``--figure`` (default ``docs/results/uncertainty-comparison.png``).

Runs still training (a checkpoint without a final evaluation) are skipped.

    KFACVI_DATA=/path/to/cifar10 python examples/cifar10_uncertainty.py --skip-training
    python examples/cifar10_uncertainty.py --skip-training --analysis docs/results/uncertainty   # committed reports
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from pyro_kfacvi.experiments.analysis import REPORT
from pyro_kfacvi.experiments.checkpoints import load_checkpoint
from pyro_kfacvi.experiments.plots import comparison_figure

#: label → (run folder name, the ``kfacvi`` arguments that train it).
RUNS = {
    "K-FAC": ("lenet5-kfac", "train --preset lenet5-kfac"),
    "KFAC-VI M=1": ("lenet5-kfacvi-m1", "train --preset lenet5-kfacvi --mc-samples 1"),
    "KFAC-VI M=10": ("lenet5-kfacvi-m10", "train --preset lenet5-kfacvi --mc-samples 10"),
    "KFAC-VI M=50": ("lenet5-kfacvi-m50", "train --preset lenet5-kfacvi --mc-samples 50"),
    "Adam": ("lenet5-adam", "baseline --method adam"),
    "SGD": ("lenet5-sgd", "baseline --method sgd"),
    "MC dropout": ("lenet5-mc-dropout", "baseline --method mc-dropout"),
    "mean-field SVI": ("lenet5-mean-field", "baseline --method mean-field"),
}


def kfacvi(arguments):
    command = [sys.executable, "-m", "pyro_kfacvi", *shlex.split(arguments)]
    print("$ kfacvi " + arguments, flush=True)
    subprocess.run(command, check=True)


def table(reports):
    header = ("| run | S | test acc | NLL | ECE | Brier | shift acc | shift ECE | OOD AUROC (entropy) | "
              "OOD AUROC (MI) |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, report in reports.items():
        s = report["summary"]
        rows.append(f"| {label} | {report['num_samples']} | {s['acc']:.2%} | {s['nll']:.3f} | {s['ece']:.3f} | "
                    f"{s['brier']:.3f} | {s['shift_acc']:.2%} | {s['shift_ece']:.3f} | {s['ood_auroc_entropy']:.3f} | "
                    f"{s['ood_auroc_mutual_information']:.3f} |")
    return "\n".join([header, *rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs", type=Path)
    parser.add_argument("--analysis", default="runs/analysis", type=Path)
    parser.add_argument("--figure", default="docs/results/uncertainty-comparison.png")
    parser.add_argument("--skip-training", action="store_true", help="leave out runs without a checkpoint")
    parser.add_argument("--analyze-args", default="--test-samples 50 --shift-size 1000 --ood-size 2000 --threads 1")
    args = parser.parse_args()
    reports = {}
    for label, (name, train) in RUNS.items():
        run, out = args.runs / name, args.analysis / name
        if not (out / REPORT).exists():
            if not (run / "checkpoint.pt").exists():
                if args.skip_training:
                    print(f"skipping {label}: no report in {out} and no checkpoint in {run}")
                    continue
                kfacvi(f"{train} --threads 1 --out {run}")
            if not load_checkpoint(run).get("final"):
                print(f"skipping {label}: {run} has not finished training")
                continue
            kfacvi(f"analyze --checkpoint {run} --out {out} {args.analyze_args}")
        reports[label] = json.loads((out / REPORT).read_text())
    print(table(reports))
    fig = comparison_figure(reports)
    fig.savefig(args.figure, dpi=110)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
