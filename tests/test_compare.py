"""Mean ± sd over seeds from run folders and analysis reports on disk (pyro_kfacvi.experiments.compare)."""
import json

import numpy as np
import pytest

from pyro_kfacvi.experiments import cli, compare

ACC, NLL, ECE = [0.5512, 0.5634, 0.5571], [1.2344, 1.2391, 1.2350], [0.08125, 0.07905, 0.08312]
BRIER, TRAIN_ACC, WALL = [0.58, 0.59, 0.585], [0.68, 0.69, 0.70], [392.74, 401.26, 388.0]


def write_run(folder, seed, final=None, **config):
    """A metrics.json as ``kfacvi train`` writes it (``final=None``: still training)."""
    folder.mkdir(parents=True)
    record = {"config": {"optimizer": "kfac", "damping": 1e-3, **config, "seed": seed}, "epochs": []}
    if final is not None:
        record["final"] = {"test_samples": 50, "epochs": 15, **final}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def write_seeds(root, name="kfac"):
    """Three runs of seeds 0, 1, 2 with the values above."""
    return [write_run(root / f"{name}-s{i}", i, {"test_acc": ACC[i], "test_nll": NLL[i], "test_ece": ECE[i],
                                                 "test_brier": BRIER[i], "train_acc": TRAIN_ACC[i],
                                                 "wall_time": WALL[i], "eval_time": 1.0})
            for i in range(3)]


def write_report(folder, checkpoint, counts, confidence, accuracy, acc=0.5, auroc_mi=0.7, method="kfacvi", run=None,
                 **info):
    """A report.json as ``kfacvi analyze`` writes it, with a 3-bin reliability diagram (``run``: the
    analysed run's metrics.json as the report copies it)."""
    folder.mkdir(parents=True)
    summary = {"acc": acc, "nll": 1.3, "ece": 0.07, "brier": 0.6, "shift_acc": 0.45, "shift_nll": 1.5,
               "shift_ece": 0.08, "ood_auroc_entropy": 0.6, "ood_auroc_mutual_information": auroc_mi}
    report = {"checkpoint": str(checkpoint), "method": method, "mc_samples": 10, "test_samples": 50, "num_samples": 50,
              "seed": 0, "shift_size": 1000, "ood_size": {"uniform_noise": 2000}, "time": 3.0,
              "test": {"acc": acc, "nll": 1.3, "brier": 0.6, "ece": 0.07, "mce": 0.2},
              "reliability": {"edges": [0.0, 1 / 3, 2 / 3, 1.0], "counts": counts, "confidence": confidence,
                              "accuracy": accuracy},
              "summary": summary, **({"run": run} if run else {}), **info}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_means_and_sample_sds_of_training_runs(tmp_path):
    runs = write_seeds(tmp_path)
    result = compare.compare({"K-FAC": runs})["K-FAC"]
    expected = {"acc": ACC, "nll": NLL, "ece": ECE, "brier": BRIER, "train_acc": TRAIN_ACC, "wall_s": WALL}
    assert set(result["metrics"]) == set(expected)
    for name, values in expected.items():
        stat = result["metrics"][name]
        assert stat["n"] == 3
        assert stat["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert stat["sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert [v["value"] for v in stat["values"]] == values
        assert [v["seed"] for v in stat["values"]] == [0, 1, 2]
        assert [v["path"] for v in stat["values"]] == [str(run / "metrics.json") for run in runs]
    assert result["warnings"] == [] and result["reliability"] is None
    assert [(r["kind"], r["seed"]) for r in result["runs"]] == [("metrics", 0), ("metrics", 1), ("metrics", 2)]


def test_one_run_has_no_sd_and_a_json_file_is_a_run(tmp_path):
    run = write_run(tmp_path / "adam", 4, {"test_acc": 0.6, "test_nll": 1.1, "test_ece": 0.1, "test_brier": 0.5})
    result = compare.compare({"Adam": [run / "metrics.json"]})
    stat = result["Adam"]["metrics"]["acc"]
    assert (stat["mean"], stat["sd"], stat["n"]) == (0.6, None, 1)
    assert "train_acc" not in result["Adam"]["metrics"]  # baselines' final has no train_acc
    assert compare.markdown(result).splitlines()[2] == "| Adam | 1 | 60.00 | 1.100 | 0.1000 | 0.5000 |"


def test_table_cells_are_rounded_from_the_json_values(tmp_path):
    result = compare.compare({"KFAC-VI M=10": write_seeds(tmp_path)})
    lines = compare.markdown(result).splitlines()
    assert lines[0] == "| label | n | acc (%) | NLL | ECE | Brier | train acc (%) | wall (s) |"
    # by hand: acc mean 55.7233 %, sd 0.6101 %; NLL 1.23617 ± 0.00256; ECE 0.08114 ± 0.00204; wall 394.0 ± 6.72
    cells = lines[2].split(" | ")
    assert cells[:5] == ["| KFAC-VI M=10", "3", "55.72 ± 0.61", "1.236 ± 0.003", "0.0811 ± 0.0020"]
    assert cells[-1] == "394.0 ± 6.7 |"
    assert cells[2] == f"{100 * np.mean(ACC):.2f} ± {100 * np.std(ACC, ddof=1):.2f}"


def test_reports_pool_their_reliability_bins_and_take_the_training_seed(tmp_path):
    run_a = write_run(tmp_path / "runs" / "a", 3, {"test_acc": 0.5})
    run_b = write_run(tmp_path / "runs" / "b", 7, {"test_acc": 0.5})
    reports = [write_report(tmp_path / "analysis" / "a", run_a, [0, 2, 6], [None, 0.5, 0.9], [None, 0.5, 0.75],
                            acc=0.52, auroc_mi=0.71),
               write_report(tmp_path / "analysis" / "b", run_b / "checkpoint.pt", [0, 3, 1], [None, 0.4, 0.8],
                            [None, 1 / 3, 1.0], acc=0.55, auroc_mi=0.74)]
    result = compare.compare({"VI": reports})["VI"]
    assert [(r["kind"], r["seed"], r["analysis_seed"]) for r in result["runs"]] == [("report", 3, 0), ("report", 7, 0)]
    assert result["metrics"]["ood_auroc_mutual_information"]["mean"] == pytest.approx(0.725)
    assert result["metrics"]["acc"]["sd"] == pytest.approx(np.std([0.52, 0.55], ddof=1))
    pooled = result["reliability"]
    # bin 1: (2·0.5 + 3·0.4)/5 and (2·0.5 + 3·1/3)/5; bin 2: (6·0.9 + 0.8)/7 and (6·0.75 + 1)/7
    assert pooled["counts"] == [0, 5, 7]
    assert pooled["confidence"] == pytest.approx([None, 0.44, 6.2 / 7])
    assert pooled["accuracy"] == pytest.approx([None, 0.4, 5.5 / 7])
    assert result["warnings"] == []


def test_a_report_carries_its_runs_seed_train_accuracy_and_wall_time(tmp_path):
    run = {"config": {"optimizer": "kfac", "seed": 5},
           "final": {"test_acc": 0.9, "train_acc": 0.8, "wall_time": 321.5, "glm_probit_test_ece": 0.02}}
    report = write_report(tmp_path / "analysis", tmp_path / "gone", [1, 0, 0], [0.2, None, None], [0.0, None, None],
                          acc=0.52, run=run)  # the checkpoint's folder is not here: the report's copy counts
    result = compare.compare({"K-FAC": [report]})["K-FAC"]
    assert result["runs"][0]["seed"] == 5
    metrics = {name: stat["mean"] for name, stat in result["metrics"].items()}
    assert (metrics["acc"], metrics["train_acc"], metrics["wall_s"], metrics["glm_ece"]) == (0.52, 0.8, 321.5, 0.02)


def test_a_laplace_posterior_and_the_guide_in_one_group_are_flagged(tmp_path):
    run = {"config": {"optimizer": "kfac", "seed": 0}, "final": {}}
    guide = write_report(tmp_path / "kfac", tmp_path / "gone", [1, 0, 0], [0.2, None, None], [0.0, None, None], run=run)
    laplace = write_report(tmp_path / "laplace", tmp_path / "gone", [1, 0, 0], [0.2, None, None], [0.0, None, None],
                           run={**run, "config": {**run["config"], "seed": 1}}, posterior="kronecker-laplace",
                           prior_variance=0.01)
    warnings = compare.compare({"K-FAC": [guide, laplace]})["K-FAC"]["warnings"]
    assert warnings == ["settings differ apart from the seed: analysis posterior: None, 'kronecker-laplace'; "
                        "analysis prior_variance: None, 0.01"]


def test_two_runs_with_one_seed_are_an_error(tmp_path):
    runs = write_seeds(tmp_path)
    with pytest.raises(ValueError, match="seed 1 twice"):
        compare.compare({"K-FAC": [*runs, write_run(tmp_path / "again", 1, {"test_acc": 0.5})]})
    reports = [write_report(tmp_path / name, tmp_path / "gone", [1, 0, 0], [0.2, None, None], [0.0, None, None])
               for name in ("r1", "r2")]  # training seed unknown: the same checkpoint twice
    with pytest.raises(ValueError, match="checkpoint .*gone twice"):
        compare.compare({"VI": reports})


def test_mixed_kinds_differing_settings_and_unfinished_runs_are_flagged(tmp_path):
    runs = write_seeds(tmp_path)
    other = write_run(tmp_path / "kfac-s3", 3, {"test_acc": 0.5}, damping=1e-2)
    training = write_run(tmp_path / "kfac-s4", 4)
    report = write_report(tmp_path / "analysis", tmp_path / "gone", [1, 0, 0], [0.2, None, None], [0.0, None, None])
    warnings = compare.compare({"K-FAC": [*runs, other, training, report]})["K-FAC"]["warnings"]
    assert warnings[0] == f"{training}: no final evaluation (still training?), left out"
    assert "mixes metrics.json and report.json" in warnings[1]
    assert warnings[2] == "settings differ apart from the seed: damping: 0.001, 0.01"
    assert warnings[3].startswith("not in every run, averaged over those that have it: nll, ece")
    table = compare.markdown(compare.compare({"K-FAC": runs + [other]})).splitlines()
    assert table[3:5] == ["", "> warning: K-FAC: settings differ apart from the seed: damping: 0.001, 0.01"]


def test_commands_write_json_markdown_and_figure(tmp_path, capsys):
    write_seeds(tmp_path / "runs", "kfac")
    run = write_run(tmp_path / "runs" / "vi-s0", 0, {"test_acc": 0.5})
    write_report(tmp_path / "analysis" / "vi-s0", run, [0, 2, 6], [None, 0.5, 0.9], [None, 0.5, 0.75])
    out = {suffix: tmp_path / f"out.{suffix}" for suffix in ("json", "md", "png")}
    argv = ["--group", "K-FAC", str(tmp_path / "runs" / "kfac-s*"), "--group", "KFAC-VI M=10",
            str(tmp_path / "analysis" / "vi-*"), "--json", str(out["json"]), "--markdown", str(out["md"]),
            "--figure", str(out["png"])]
    assert cli.main(["compare", *argv]) == 0
    printed = capsys.readouterr().out
    expected = compare.compare({"K-FAC": sorted((tmp_path / "runs").glob("kfac-s*")),
                                "KFAC-VI M=10": [tmp_path / "analysis" / "vi-s0"]})
    assert json.loads(out["json"].read_text()) == expected
    assert out["md"].read_text() == printed == compare.markdown(expected) + "\n"
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out["png"].unlink()
    assert compare.main(argv) == 0 and out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_glob_matching_nothing_is_an_error(tmp_path, capsys):
    assert compare.main(["--group", "K-FAC", str(tmp_path / "nothing*")]) == 2
    assert "nothing matches" in capsys.readouterr().err


def test_a_glob_skips_the_logs_beside_the_runs(tmp_path, capsys):
    """``runs/kfac-s*`` also meets ``runs/kfac-s0.log``: only folders and JSON files are runs."""
    for folder in write_seeds(tmp_path):
        folder.with_suffix(".log").write_text("epoch 1 ...")
    assert compare.main(["--group", "K-FAC", str(tmp_path / "kfac-s*"), "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["K-FAC"]["metrics"]["acc"]["n"] == 3


def test_the_laplace_baselines_linearised_predictive_is_a_metric_of_its_own(tmp_path):
    runs = [write_run(tmp_path / f"laplace-s{i}", i, {"test_acc": 0.6, "test_nll": 1.0, "glm_probit_test_acc": acc,
                                                      "glm_probit_test_ece": 0.01 * (i + 1)}, method="laplace")
            for i, acc in enumerate((0.64, 0.66))]
    metrics = compare.compare({"Laplace": runs})["Laplace"]["metrics"]
    assert metrics["glm_acc"]["mean"] == pytest.approx(0.65)
    assert metrics["glm_acc"]["sd"] == pytest.approx(2 ** 0.5 / 100)  # two values ±0.01 from their mean
    assert metrics["glm_ece"]["mean"] == pytest.approx(0.015) and metrics["acc"]["mean"] == pytest.approx(0.6)
    assert "GLM acc (%)" in compare.markdown(compare.compare({"Laplace": runs}))
