"""Several seeds of several methods, from their files on disk: mean ± sd over the seeds, as JSON,
a markdown table and one figure (nothing is trained or evaluated).

    python -m pyro_kfacvi.experiments.compare --group K-FAC 'runs/kfac-s*' \\
        --group 'KFAC-VI M=10' 'runs/vi10-s*' --json OUT.json --markdown OUT.md --figure OUT.png

(or ``kfacvi compare ...``). Each ``--group LABEL GLOB`` adds the matches of GLOB (expanded here:
quote it) to the group LABEL; a label given twice collects both globs. A match is a run folder of
``kfacvi train`` / ``kfacvi baseline`` (``metrics.json``), a folder of ``kfacvi analyze``
(``report.json``), or either file itself. The markdown table is printed.

Metrics of a run:

* ``metrics.json``: its ``final`` record, renamed: ``test_acc, test_nll, test_ece, test_brier`` →
  ``acc, nll, ece, brier``, ``train_acc``, ``wall_time`` → ``wall_s``, and the Laplace baseline's
  ``glm_probit_test_*`` → ``glm_*``; a run without ``final`` (still training) is left out with a
  warning. Its seed is ``config["seed"]``.
* ``report.json``: every number of its ``summary`` (test ``acc, nll, ece, brier``, ``shift_*``,
  ``ood_auroc_entropy``, ``ood_auroc_mutual_information`` — the mutual-information AUROC — and the
  AUROC per OOD set), and the analysed run's ``train_acc``, ``wall_s`` and ``glm_*``. Its ``seed``
  is the analysis seed, not the training seed: the seed is ``config["seed"]`` of the analysed
  run's ``metrics.json`` — the copy ``kfacvi analyze`` keeps in the report (``report["run"]``),
  else the file beside ``report["checkpoint"]`` (relative to the working directory) — or unknown
  (``null``).

Per group and metric, ``mean``, ``sd`` (sample standard deviation, n − 1; ``null`` for one run)
and ``n`` over the runs that have it. The JSON written by ``--json`` is :func:`compare`'s result::

    {LABEL: {"runs": [{"path", "kind": "metrics"|"report", "seed", "analysis_seed" (reports)}],
             "metrics": {NAME: {"mean", "sd", "n", "values": [{"seed", "path", "value"}]}},
             "reliability": {"edges", "counts", "confidence", "accuracy"} | null,
             "warnings": [TEXT]}}

``reliability`` pools the reports' diagrams: counts summed per bin, confidence and accuracy
weighted by the counts (``null`` in an empty bin). Warnings, not errors: a group mixing the two
kinds of file, runs whose settings differ apart from the seed (training configuration; for
reports also the method and the analysis sizes), a metric missing from some runs. An error: two
runs of one group with the same seed (or, seed unknown, reports of the same checkpoint).
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

from .analysis import REPORT
from .checkpoints import METRICS, atomic_write

__all__ = ["compare", "figure", "load_run", "main", "markdown", "pool_reliability"]

#: ``final`` keys of metrics.json → metric names.
FINAL_METRICS = {"test_acc": "acc", "test_nll": "nll", "test_ece": "ece", "test_brier": "brier",
                 "train_acc": "train_acc", "wall_time": "wall_s",
                 # the Laplace baseline's linearised (GLM, probit) predictive beside its MC one
                 **{f"glm_probit_test_{m}": f"glm_{m}" for m in ("acc", "nll", "ece", "brier")}}
#: metrics of the analysed run that a report's row carries beside the analysis' own.
RUN_METRICS = ("train_acc", "wall_s", "glm_acc", "glm_nll", "glm_ece", "glm_brier")
#: report.json keys that must agree within a group (besides the analysed run's configuration).
REPORT_SETTINGS = ("method", "posterior", "prior_variance", "mc_samples", "num_samples", "test_samples", "shift_size",
                   "ood_size")
#: Table columns and bar charts: metric → (header, scale, decimals).
COLUMNS = {"acc": ("acc (%)", 100, 2), "nll": ("NLL", 1, 3), "ece": ("ECE", 1, 4), "brier": ("Brier", 1, 4),
           "shift_acc": ("shift acc (%)", 100, 2), "shift_nll": ("shift NLL", 1, 3), "shift_ece": ("shift ECE", 1, 4),
           "ood_auroc_entropy": ("OOD AUROC (entropy)", 1, 3),
           "ood_auroc_mutual_information": ("OOD AUROC (MI)", 1, 3),
           "glm_acc": ("GLM acc (%)", 100, 2), "glm_nll": ("GLM NLL", 1, 3), "glm_ece": ("GLM ECE", 1, 4),
           "glm_brier": ("GLM Brier", 1, 4),
           "train_acc": ("train acc (%)", 100, 2), "wall_s": ("wall (s)", 1, 1)}


#: panels per row of :func:`figure`.
PANELS_PER_ROW = 6


def _json_file(path: Path) -> Path:
    """The metrics.json or report.json that ``path`` names or holds."""
    if path.is_file():
        return path
    found = [path / name for name in (METRICS, REPORT) if (path / name).is_file()]
    if len(found) != 1:
        raise ValueError(f"{path}: expected a folder with {METRICS} or {REPORT}, or either file "
                         f"({'both are there' if found else 'found neither'})")
    return found[0]


def _without_seed(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "seed"}


def _analysed_run(report: dict) -> dict | None:
    """The metrics.json (``config``, ``final``) of the run that ``report`` analysed: the copy in the
    report, else the file beside the checkpoint if it is here."""
    if report.get("run"):
        return report["run"]
    if not report.get("checkpoint"):
        return None
    checkpoint = Path(report["checkpoint"])
    path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path) -> dict | None:
    """One run: ``path`` (the JSON file), ``kind``, ``seed``, ``setting`` (what must agree within a
    group), ``metrics`` and ``reliability`` (reports); ``None`` for a run without a final evaluation."""
    file = _json_file(Path(path))
    data = json.loads(file.read_text())
    if file.name == REPORT:
        run = _analysed_run(data) or {}
        config, final = run.get("config"), run.get("final") or {}
        training = {name: final[key] for key, name in FINAL_METRICS.items() if name in RUN_METRICS and key in final}
        return {"path": str(file), "kind": "report", "seed": None if config is None else config["seed"],
                "analysis_seed": data.get("seed"), "checkpoint": data.get("checkpoint"),
                "setting": {**_without_seed(config or {}), **{f"analysis {k}": data.get(k) for k in REPORT_SETTINGS}},
                "metrics": {**data["summary"], **training}, "reliability": data.get("reliability")}
    if not data.get("final"):
        return None
    return {"path": str(file), "kind": "metrics", "seed": data["config"]["seed"],
            "setting": _without_seed(data["config"]), "reliability": None,
            "metrics": {name: data["final"][key] for key, name in FINAL_METRICS.items() if key in data["final"]}}


def _check_duplicates(label, runs):
    """Raise ValueError if two runs share a seed (or, seed unknown, a report's checkpoint)."""
    seen = {}
    for run in runs:
        key = ("seed", run["seed"]) if run["seed"] is not None else ("checkpoint", run["checkpoint"])
        if key in seen:
            raise ValueError(f"group {label!r}: {key[0]} {key[1]} twice: {seen[key]} and {run['path']}")
        seen[key] = run["path"]


def _differences(runs) -> dict:
    """``{setting: [distinct values]}`` for the settings, among those every run has, that differ
    between runs of the same kind."""
    differ = {}
    for kind in dict.fromkeys(run["kind"] for run in runs):
        settings = [run["setting"] for run in runs if run["kind"] == kind]
        for key in [k for k in settings[0] if all(k in s for s in settings)]:
            values = []
            for setting in settings:
                if setting[key] not in values:
                    values.append(setting[key])
            if len(values) > 1:
                differ[key] = values
    return differ


def _statistics(runs, name) -> dict:
    """Mean, sample sd (n − 1) and n of metric ``name`` over the runs that have it."""
    have = [run for run in runs if name in run["metrics"]]
    values = [run["metrics"][name] for run in have]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": [{"seed": run["seed"], "path": run["path"], "value": run["metrics"][name]}
                                         for run in have]}


def pool_reliability(diagrams: list[dict]) -> dict:
    """One reliability diagram from several with the same bin edges: counts summed per bin,
    confidence and accuracy the count-weighted means (``None`` in a bin empty in every diagram)."""
    pooled = {"edges": diagrams[0]["edges"], "counts": [], "confidence": [], "accuracy": []}
    for i in range(len(pooled["edges"]) - 1):
        total = sum(d["counts"][i] for d in diagrams)
        pooled["counts"].append(total)
        for key in ("confidence", "accuracy"):
            weighted = sum(d["counts"][i] * d[key][i] for d in diagrams if d["counts"][i])
            pooled[key].append(weighted / total if total else None)
    return pooled


def _pooled(runs, warnings) -> dict | None:
    """The pooled reliability diagram of the runs that have one, if any and if their bins agree."""
    diagrams = [run["reliability"] for run in runs if run["reliability"]]
    if len({tuple(d["edges"]) for d in diagrams}) > 1:
        warnings.append("reliability diagrams with different bins: not pooled")
        return None
    return pool_reliability(diagrams) if diagrams else None


def _group(label, paths) -> dict:
    """The entry of one group in :func:`compare`'s result."""
    runs, warnings = [], []
    for path in paths:
        run = load_run(path)
        if run is None:
            warnings.append(f"{path}: no final evaluation (still training?), left out")
        else:
            runs.append(run)
    if not runs:
        raise ValueError(f"group {label!r}: no finished run among {len(paths)} path(s)")
    _check_duplicates(label, runs)
    if len({run["kind"] for run in runs}) > 1:
        warnings.append(f"mixes {METRICS} and {REPORT} files: their acc, nll, ece and brier are averaged together")
    differ = _differences(runs)
    if differ:
        warnings.append("settings differ apart from the seed: " +
                        "; ".join(f"{k}: {', '.join(map(repr, v))}" for k, v in differ.items()))
    names = dict.fromkeys(name for run in runs for name in run["metrics"])
    metrics = {name: _statistics(runs, name) for name in names}
    partial = [name for name, m in metrics.items() if m["n"] < len(runs)]
    if partial:
        warnings.append(f"not in every run, averaged over those that have it: {', '.join(partial)}")
    reliability = _pooled(runs, warnings)
    entries = [{"path": run["path"], "kind": run["kind"], "seed": run["seed"],
                **({"analysis_seed": run["analysis_seed"]} if run["kind"] == "report" else {})} for run in runs]
    return {"runs": entries, "metrics": metrics, "reliability": reliability, "warnings": warnings}


def compare(groups: dict) -> dict:
    """``{label: [paths]}`` → ``{label: {"runs", "metrics", "reliability", "warnings"}}`` (see the
    module docstring); ValueError if a group has two runs with the same seed."""
    return {label: _group(label, [str(p) for p in paths]) for label, paths in groups.items()}


def _columns(result) -> list[str]:
    return [name for name in COLUMNS if any(name in group["metrics"] for group in result.values())]


def _cell(stat, scale, decimals) -> str:
    if stat is None:
        return "–"
    mean = f"{stat['mean'] * scale:.{decimals}f}"
    return mean if stat["sd"] is None else f"{mean} ± {stat['sd'] * scale:.{decimals}f}"


def markdown(result: dict) -> str:
    """``| label | n | acc (%) | NLL | ... |`` with ``mean ± sd`` cells (accuracies in percent),
    the columns of :data:`COLUMNS` that some group has; then the warnings as quoted lines."""
    columns = _columns(result)
    lines = ["| label | n | " + " | ".join(COLUMNS[c][0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for label, group in result.items():
        cells = [_cell(group["metrics"].get(c), *COLUMNS[c][1:]) for c in columns]
        lines.append(f"| {label} | {len(group['runs'])} | " + " | ".join(cells) + " |")
    warnings = [f"> warning: {label}: {text}" for label, group in result.items() for text in group["warnings"]]
    return "\n".join(lines + ([""] + warnings if warnings else []))


def _bars(ax, result, name, labelled):
    """Mean of metric ``name`` per group, with ±sd error bars: one row per group, in the groups'
    order in every panel (a group without the metric leaves its row empty); group names on the
    panels that are ``labelled``."""
    header, scale, _ = COLUMNS[name]
    rows = [(i, group["metrics"][name]) for i, group in enumerate(result.values()) if name in group["metrics"]]
    ax.barh([i for i, _ in rows], [s["mean"] * scale for _, s in rows],
            xerr=[(s["sd"] or 0) * scale for _, s in rows], capsize=3, color=[f"C{i}" for i, _ in rows])
    ax.set_yticks(range(len(result)), list(result) if labelled else [], fontsize=8)
    ax.set_ylim(len(result) - 0.5, -0.5)
    ax.set_title(header, fontsize=9)


def _grid(subfigure, count):
    """``count`` axes in rows of at most :data:`PANELS_PER_ROW`, the unused cells hidden."""
    columns = min(count, PANELS_PER_ROW)
    axes = subfigure.subplots(-(-count // columns), columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return axes[:count]


def _reliability(ax, diagram, title):
    """Accuracy per non-empty bin against the diagonal; the shaded part reaches the mean confidence."""
    edges = diagram["edges"]
    kept = [i for i, count in enumerate(diagram["counts"]) if count > 0]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in kept]
    accuracy = [diagram["accuracy"][i] for i in kept]
    gap = [diagram["confidence"][i] - diagram["accuracy"][i] for i in kept]
    width = edges[1] - edges[0]
    ax.bar(centres, accuracy, width=width, edgecolor="k", linewidth=0.5, label="accuracy")
    ax.bar(centres, gap, bottom=accuracy, width=width, color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", box_aspect=1)
    ax.set_title(title, fontsize=9)


def figure(result: dict, path) -> None:
    """Write one figure to ``path`` (format from its suffix): bar charts, mean ± sd per group for each
    table column, and below them the pooled reliability diagram of each group that has one (rows of
    at most :data:`PANELS_PER_ROW` panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = _columns(result)
    diagrams = {label: group for label, group in result.items() if group["reliability"]}
    bar_rows, diagram_rows = -(-len(columns) // PANELS_PER_ROW), -(-len(diagrams) // PANELS_PER_ROW)
    bar_height = bar_rows * (1.2 + 0.22 * len(result))
    fig = Figure(figsize=(2.0 + 2.6 * min(max(len(columns), len(diagrams)), PANELS_PER_ROW),
                          bar_height + 3.2 * diagram_rows), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = (fig.subfigures(2, 1, height_ratios=[bar_height, 3.2 * diagram_rows]) if diagrams
                   else (fig, None))
    for i, (ax, name) in enumerate(zip(_grid(top, len(columns)), columns)):
        _bars(ax, result, name, labelled=i % PANELS_PER_ROW == 0)
    if diagrams:
        for ax, (label, group) in zip(_grid(bottom, len(diagrams)), diagrams.items()):
            pooled = sum(run["kind"] == "report" for run in group["runs"])
            _reliability(ax, group["reliability"], f"{label}: {pooled} report(s) pooled")
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=110))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kfacvi compare`` / ``python -m pyro_kfacvi.experiments.compare``."""
    parser.add_argument("--group", nargs=2, action="append", required=True, metavar=("LABEL", "GLOB"),
                        help="runs of one group: run folders, analysis folders or their JSON files (quote the glob; "
                             "repeat a label to add more)")
    parser.add_argument("--json", metavar="FILE", help="write the aggregated numbers here")
    parser.add_argument("--markdown", metavar="FILE", help="write the table here")
    parser.add_argument("--figure", metavar="FILE", help="write the figure here (PNG, or the suffix's format)")


def run(args) -> int:
    """Expand the globs, aggregate, print the table and write the requested files; 2 on an error."""
    groups = {}
    try:
        for label, pattern in args.group:
            # a folder or a JSON file is a run; anything else a glob meets (a run's log) is not
            paths = sorted(p for p in glob.glob(pattern) if Path(p).is_dir() or p.endswith(".json"))
            if not paths:
                raise ValueError(f"--group {label!r}: nothing matches {pattern!r}")
            groups.setdefault(label, []).extend(paths)
        result = compare(groups)
    except (ValueError, OSError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table)
    if args.json:
        atomic_write(args.json, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write((table + "\n").encode()))
    if args.figure:
        figure(result, args.figure)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyro_kfacvi.experiments.compare", allow_abbrev=False,
                                     description="Mean ± sd over seeds of groups of runs: "
                                     "a markdown table, JSON and a figure, from their files.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
