"""Figures of an uncertainty report (:func:`pyro_kfacvi.analysis.analyze`), drawn from the report
alone (so ``report.json`` reproduces them), with matplotlib's object API (no pyplot state):

* ``reliability.png``: accuracy per confidence bin against the diagonal, with the gap shaded;
* ``confidence.png``: histogram of the confidence max_c p̄_c, correct and wrong predictions;
* ``entropy.png``: predictive entropy (and mutual information) in and out of distribution;
* ``shift.png``: accuracy and ECE against the corruption severity (0: clean test images).

:func:`comparison_figure` puts several reports side by side.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoints import atomic_write

__all__ = ["comparison_figure", "confidence_figure", "entropy_figure", "reliability_figure", "save_figures",
           "shift_figure"]


def _figure(width, height, ncols=1):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _bar_centres(edges):
    return [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])], edges[1] - edges[0]


def reliability_figure(report, title=""):
    """Accuracy per non-empty confidence bin (bars) against perfect calibration (diagonal); the
    shaded part reaches the bin's mean confidence."""
    rel = report["reliability"]
    centres, width = _bar_centres(rel["edges"])
    kept = [i for i, count in enumerate(rel["counts"]) if count > 0]
    centres = [centres[i] for i in kept]
    accuracy = [rel["accuracy"][i] for i in kept]
    confidence = [rel["confidence"][i] for i in kept]
    fig, ax = _figure(4.6, 4.4)
    ax.bar(centres, accuracy, width=width, edgecolor="k", linewidth=0.5, label="accuracy")
    ax.bar(centres, [c - a for c, a in zip(confidence, accuracy)], bottom=accuracy, width=width, color="tab:red",
           alpha=0.35, edgecolor="tab:red", linewidth=0.5, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    test = report["test"]
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max predictive probability)", ylabel="accuracy",
           title=f"{title}\nECE {test['ece']:.3f}, MCE {test['mce']:.3f}, acc {test['acc']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def confidence_figure(report, title=""):
    """Histogram of the confidence of correct and wrong test predictions."""
    hist = report["confidence_histogram"]
    centres, width = _bar_centres(hist["edges"])
    fig, ax = _figure(4.6, 3.6)
    ax.bar(centres, hist["correct"], width=width, edgecolor="k", linewidth=0.5, label="correct")
    ax.bar(centres, hist["incorrect"], bottom=hist["correct"], width=width, color="tab:red", edgecolor="k",
           linewidth=0.5, label="wrong")
    ax.set(xlim=(0, 1), xlabel="confidence (max predictive probability)", ylabel="test images", title=title)
    ax.legend(fontsize=8)
    return fig


def entropy_figure(report, title=""):
    """Densities of the OOD scores on the test set and on each OOD set."""
    scores = [s for s in ("entropy", "mutual_information") if report["num_samples"] > 1 or s == "entropy"]
    fig, axes = _figure(4.8 * len(scores), 3.8, len(scores))
    axes = axes if len(scores) > 1 else [axes]
    for ax, score in zip(axes, scores):
        hist = dict(report["score_histograms"][score])
        edges = hist.pop("edges")
        centres, width = _bar_centres(edges)
        for name, counts in hist.items():
            total = sum(counts)
            auroc = "" if name == "cifar10_test" else f" (AUROC {report['ood'][name][f'auroc_{score}']:.3f})"
            ax.step(centres, [c / total / width for c in counts], where="mid", linewidth=2 if auroc == "" else 1.3,
                    color="k" if auroc == "" else None, label=f"{name}{auroc}")
        label = "predictive entropy H[p̄] (nats)" if score == "entropy" else "mutual information (nats)"
        ax.set(xlabel=label, ylabel="density", yscale="log", title=title)
        ax.legend(fontsize=7)
    return fig


def shift_figure(report, title=""):
    """Accuracy and ECE against the severity of each corruption; severity 0 is the clean test set."""
    fig, (ax_acc, ax_ece) = _figure(9.5, 3.8, 2)
    corruptions = dict.fromkeys(row["corruption"] for row in report["shift"])
    for ax, key in ((ax_acc, "acc"), (ax_ece, "ece")):
        for name in corruptions:
            rows = [r for r in report["shift"] if r["corruption"] == name]
            ax.plot([0] + [r["severity"] for r in rows], [report["test"][key]] + [r[key] for r in rows], "o-",
                    markersize=3, label=name)
        ax.set(xlabel="severity (0: clean)", ylabel={"acc": "accuracy", "ece": "ECE (15 bins)"}[key],
               title=f"{title} ({report['shift_size']} images)" if key == "acc" else title)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    return fig


_FIGURES = {"reliability.png": reliability_figure, "confidence.png": confidence_figure,
            "entropy.png": entropy_figure, "shift.png": shift_figure}


def save_figures(report, out_dir, title=""):
    """Write every figure of the report into ``out_dir``; returns their paths."""
    paths = []
    for name, draw in _FIGURES.items():
        fig = draw(report, title)
        fig.tight_layout()
        path = Path(out_dir) / name
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        paths.append(path)
    return paths


def comparison_figure(reports: dict):
    """``{label: report}`` side by side: test NLL and ECE, ECE averaged over the corruptions of each
    severity, and the OOD AUROC of the predictive entropy and of the mutual information, averaged
    over the OOD sets (0.5: chance)."""
    fig, axes = _figure(16, 3.8, 4)
    labels = list(reports)
    positions = range(len(labels))
    for ax, key, name in ((axes[0], "nll", "test NLL"), (axes[1], "ece", "test ECE")):
        ax.bar(positions, [reports[k]["test"][key] for k in labels], color=[f"C{i}" for i in positions])
        ax.set_xticks(list(positions), labels, rotation=35, ha="right", fontsize=8)
        ax.set(title=name)
    for i, label in enumerate(labels):
        report = reports[label]
        severities = sorted({r["severity"] for r in report["shift"]})
        means = [sum(r["ece"] for r in report["shift"] if r["severity"] == s) /
                 sum(1 for r in report["shift"] if r["severity"] == s) for s in severities]
        axes[2].plot([0] + severities, [report["test"]["ece"]] + means, "o-", color=f"C{i}", markersize=3, label=label)
    axes[2].set(xlabel="severity (0: clean)", ylabel="ECE, mean over corruptions", title="calibration under shift")
    axes[2].legend(fontsize=7)
    for offset, score, hatch in ((-0.2, "entropy", None), (0.2, "mutual_information", "//")):
        axes[3].bar([i + offset for i in positions], [reports[k]["summary"][f"ood_auroc_{score}"] for k in labels],
                    width=0.4, color=[f"C{i}" for i in positions], hatch=hatch, edgecolor="k", linewidth=0.5)
    axes[3].axhline(0.5, color="k", linestyle="--", linewidth=1)
    axes[3].set_xticks(list(positions), labels, rotation=35, ha="right", fontsize=8)
    axes[3].set(ylim=(0, 1), ylabel="AUROC, mean over OOD sets",
                title="OOD AUROC: entropy, MI (hatched)")
    fig.tight_layout()
    return fig
