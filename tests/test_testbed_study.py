"""The testbed study end to end on a tiny setting, and its bad input."""

import json
import math

import imageio.v3 as iio
import pytest

from mvsdi.cli import main
from mvsdi.field import FieldConfig
from mvsdi.statistics import mean_interval
from mvsdi.testbed import cli as testbed_cli
from mvsdi.testbed.cells import variance_rows
from mvsdi.testbed.settings import METHODS, StudySettings
from mvsdi.testbed.study import run_study
from mvsdi.testbed.tables import summarise, table_markdown, variance_markdown, variance_summary

TINY = StudySettings(scenes=("mug",), seeds=(0,), guidances=("sds",), budgets=(8,), image_size=16, references=16,
                     samples_per_ray=12, fractions=(1.0,), variance_repeats=3, variance_fractions=(0.0, 1.0),
                     field=FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0,
                                       hidden_dim=16))


def test_study_writes_tables_plots_and_turntables(tmp_path, capsys):
    METHODS = TINY.method_list
    log = []
    result = run_study(TINY, tmp_path, log=log.append)
    printed = capsys.readouterr().out
    assert printed.startswith("testbed study: 6 cells")  # says what it does before the slow prior is built
    assert "building the ideal-denoiser prior: 16 reference views of each of the 8 scenes at 16²" in printed
    assert "the first-seed K1 runs also measure the gradient variance" in printed
    assert "[7/7] " in printed and "sds mug seed 0 K1, budget 8: r_precision" in printed  # the initial field + 6 cells
    assert [r["message"] for r in log] == printed.splitlines()
    files = {p.name for p in tmp_path.iterdir()}
    assert {"results.jsonl", "variance.json", "table.md", "table.csv", "metrics_vs_budget.png",
            "variance_ratio.png", "turntable_sds_mug.gif", "study.json"} <= files
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(METHODS) * 2  # initial + end of budget per method
    assert {r["method"] for r in rows} == {m.name for m in METHODS}
    final = [r for r in rows if r["fraction"] == 1.0]
    assert all(r["guidance_evaluations"] == 8 for r in final)
    assert all(r["unet_calls"] == 8 for r in final)  # SDS: one call per evaluation, counted per cell
    table = (tmp_path / "table.md").read_text()
    assert all(m.name in table for m in METHODS) and "Δpsnr vs K1" in table
    k1 = next(r for r in result["table"] if r["method"] == "K1")
    assert k1["psnr_vs_K1"][0] == 0.0  # the baseline's paired difference with itself
    variance = json.loads((tmp_path / "variance.json").read_text())
    assert [(v["fraction"], v["method"]) for v in variance] == [(f, m.name) for f in (0.0, 1.0) for m in METHODS]
    assert all(v["ratio"] == 1.0 for v in variance if v["method"] == "K1")
    assert all(v["ratio_low"] <= v["ratio_high"] for v in variance)
    k1_start, k1_end = (next(v for v in variance if v["method"] == "K1" and v["fraction"] == f) for f in (0.0, 1.0))
    assert k1_start["per_evaluation"] != k1_end["per_evaluation"]  # measured at trained parameters, not the blob
    assert "at 0 of the run" in table and "at 1 of the run" in table
    gif = iio.imread(tmp_path / "turntable_sds_mug.gif")
    assert gif.shape[0] == 50 and gif.shape[1] > 128 and gif.shape[2] == 128 * (len(METHODS) + 1)  # truth + methods
    captions = gif[0, :gif.shape[1] - 128].reshape(gif.shape[1] - 128, len(METHODS) + 1, 128, 3).swapaxes(0, 1)
    assert all((c > 200).any() for c in captions)  # white text over each panel
    assert len({c.tobytes() for c in captions}) == len(METHODS) + 1  # each panel's own: method and metrics


def test_the_variance_at_the_start_of_the_run_is_the_estimator_at_the_initial_field():
    import torch

    from mvsdi.distill import Distiller, Model
    from mvsdi.testbed.prior import IdealDenoiserPrior
    from mvsdi.testbed.cells import run_cell
    from mvsdi.testbed.settings import cell_config
    from mvsdi.variance import estimator_variance

    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=TINY.references, image_size=TINY.image_size, device=cpu)
    config = cell_config(TINY, "sds", METHODS[0], "mug", 0)
    cell = run_cell(prior, config, (), cpu, snapshot_at=(0.0, 0.5))
    assert cell.rows == [] and sorted(cell.snapshots) == [0.0, 0.5]
    fresh = Model.create(config, cpu)
    assert all(torch.equal(a, b) for a, b in zip(fresh.field.state_dict().values(),
                                                 cell.snapshots[0.0]["field"].values()))
    assert not torch.equal(fresh.field.state_dict()["encoding.embeddings"],
                           cell.snapshots[0.5]["field"]["encoding.embeddings"])  # trained half the budget
    rows = variance_rows(TINY, prior, "sds", "mug", 0, {0.0: cell.snapshots[0.0]}, cpu)
    direct = estimator_variance(Distiller(config, prior, fresh, cpu), 0.0, TINY.variance_repeats, seed=0)
    assert rows[0]["per_evaluation"] == pytest.approx(direct.per_evaluation, rel=1e-9)


def test_a_cell_whose_training_diverges_is_measured_where_it_stopped(monkeypatch):
    """distill.train stops a run whose rollbacks are spent; the cell's rows say so instead of
    measuring a fraction of the budget it never reached as if it had."""
    import dataclasses

    import torch

    from mvsdi.distill import Model
    from mvsdi.testbed.cells import run_cell
    from mvsdi.testbed.prior import IdealDenoiserPrior
    from mvsdi.testbed.settings import cell_config

    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=TINY.references, image_size=TINY.image_size, device=cpu)
    config = dataclasses.replace(cell_config(TINY, "sds", METHODS[0], "mug", 0), max_consecutive_skips=1,
                                 max_rollbacks=1)
    real, calls = Model.gradient_norm, []

    def fails_after_three_steps(model):
        calls.append(1)
        return real(model) if len(calls) <= 3 else math.nan

    monkeypatch.setattr(Model, "gradient_norm", fails_after_three_steps)
    cell = run_cell(prior, config, (0.5, 1.0), cpu)
    # steps 0-2 applied; step 3 skipped → back to the call's start (step 0); skipped again → diverged
    assert [r["fraction"] for r in cell.rows] == [0.5, 1.0]
    assert all(r["diverged"] and "training diverged" in r["diverged_reason"] for r in cell.rows)
    assert all(r["guidance_evaluations"] == 5 for r in cell.rows)  # spent, the rolled-back steps included
    assert len(calls) == 5 and cell.frames.shape[0] == config.eval_views


def test_summary_statistics():
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.302653 / 3 ** 0.5))  # t(0.975, 2) = 4.302653
    rows = [{"guidance": "sds", "scene": "a", "seed": s, "method": m, "fraction": 1.0, "diverged": False, "budget": 8,
             "r_precision": 1.0, "psnr": base + (1.0 if m == "K2-antipodal" else 0.0),
             "iou": 0.5 + 0.1 * s * (m == "K1"), "janus": 0.2 * (m == "K2-antipodal")}
            for s, base in ((0, 20.0), (1, 25.0)) for m in ("K1", "K2-antipodal")]
    table = {r["method"]: r for r in summarise(rows)}
    k2 = table["K2-antipodal"]
    assert k2["psnr_vs_K1"] == (1.0, 0.0) and k2["pairs"] == 2  # paired: the seeds' offsets cancel
    assert k2["psnr"][0] == 23.5
    # +1 dB on both pairs: better; IoU differences 0 and -0.1: the interval holds 0; Janus +0.2 twice: worse
    assert (k2["psnr_verdict"], k2["iou_verdict"], k2["janus_verdict"]) == ("better", "not distinguishable", "worse")
    assert table["K1"]["psnr_verdict"] == "baseline"
    text = table_markdown(summarise(rows))
    assert "| sds | 8 | K2-antipodal | 2 |" in text and "+1.000 ± 0.000 **better**" in text and "**n.d.**" in text
    alone = table_markdown(summarise([r for r in rows if r["method"] == "K1"]))
    assert "| sds | 8 | K1 |" in alone and "Paired differences" not in alone  # no empty table for K1 alone


def test_variance_ratios_combine_over_scenes_as_a_geometric_mean_with_their_bootstrap_errors():
    rows = [{"guidance": "sds", "scene": scene, "method": "K2-random", "fraction": 0.5, "ratio": ratio,
             "log_ratio_se": 0.1} for scene, ratio in (("a", 0.5), ("b", 2.0))]
    rows += [{"guidance": "sds", "scene": scene, "method": "K1", "fraction": 0.5, "ratio": 1.0, "log_ratio_se": 0.0}
             for scene in ("a", "b")]
    ratio, low, high = variance_summary(rows)[("sds", "K2-random", 0.5)]
    half = 1.96 * math.sqrt(2 * 0.1 ** 2) / 2
    assert ratio == pytest.approx(1.0) and (low, high) == pytest.approx((math.exp(-half), math.exp(half)))
    text = variance_markdown(rows)
    assert "at 0.5 of the run" in text and f"1.00 [{math.exp(-half):.2f}, {math.exp(half):.2f}]" in text


def test_two_draws_give_no_interval_and_the_table_says_so():
    """R = 2: the paired bootstrap has one resample of distinct draws; the table printed [nan, nan]."""
    rows = [{"guidance": "sds", "scene": "a", "method": m, "fraction": 0.0, "ratio": r, "repeats": 2,
             "ratio_low": math.nan, "ratio_high": math.nan, "log_ratio_se": math.nan}
            for m, r in (("K1", 1.0), ("K2-antipodal", 0.8))]
    text = variance_markdown(rows)
    assert "0.80 [n/a: R=2 < 3]" in text and "nan" not in text


def test_every_figure_gives_a_method_the_same_colour(tmp_path, monkeypatch):
    from mvsdi.testbed import figures as study_figures
    from mvsdi.testbed.settings import METRICS

    figures = []
    monkeypatch.setattr(study_figures, "save_figure", lambda fig, path, dpi=100: figures.append(fig))
    results = [{"guidance": "sds", "method": m.name, "fraction": f, "budget": 8, **{k: 0.5 for k in METRICS}}
               for m in METHODS for f in (0.0, 1.0)]
    variance = [{"guidance": "sds", "method": m.name, "fraction": f, "ratio": 1.0, "log_ratio_se": 0.1}
                for m in METHODS for f in (0.0, 1.0)]
    study_figures.plot_metric_vs_budget(results, tmp_path)
    study_figures.plot_variance(variance, tmp_path)
    colours = [{h.get_label(): h.get_color() for h in fig.axes[0].get_lines() if not h.get_label().startswith("_")}
               | {c.get_label(): c.lines[0].get_color() for c in fig.axes[0].containers} for fig in figures]
    shared = set(colours[0]) & set(colours[1])
    assert shared == {m.name for m in METHODS[1:]}  # the variance plot leaves K1 out
    assert all(colours[0][name] == colours[1][name] for name in shared)


@pytest.mark.parametrize("args,message", [(["--scenes", "teapot"], "teapot"),
                                          (["--budget", "6"], "multiple of every method's K"),
                                          (["--guidance", "vsd"], "unknown guidance"),
                                          (["--seeds", "two"], "comma-separated integers"),
                                          (["--seeds", "0,1,0"], "each once"),
                                          (["--variance-repeats", "1"], "two draws"),
                                          (["--methods", "K2-antipodal,K1"], "K1 first"),
                                          (["--methods", "K1,K3"], "distinct names from"),
                                          (["--budget", "96,x"], "several separated by commas"),
                                          (["--workers", "0"], "at least 1"),
                                          (["--full", "--setting", "medium"], "cannot be combined")])
def test_bad_testbed_input(args, message, tmp_path, capsys):
    assert main(["testbed", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_seeds_are_a_list_as_in_the_bench_and_help_names_the_scenes(capsys):
    import argparse

    from mvsdi.testbed import cli
    from mvsdi.testbed.scenes import SCENES

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["testbed", "--seeds", "3,5"])
    assert cli.settings_from_args(args).seeds == (3, 5)
    assert cli.settings_from_args(parser.parse_args(["testbed", "--seeds", "3"])).seeds == (3,)  # seed 3, not 3 seeds
    with pytest.raises(SystemExit):
        main(["testbed", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "comma-separated seeds, e.g. 0,1,2" in text
    assert all(name in text for name in SCENES) and "--overwrite" in text


# ---------------------------------------------------------------------------------------------
# the study folder: an earlier study is refused, or replaced whole; never mixed


def fake_study(settings, out, progress=True, log=None, workers=None):
    """Stands in for run_study: writes what a study writes, in a few milliseconds."""
    (out / "table.md").write_text("| new |\n")
    (out / "turntable_sds_mug.gif").write_bytes(b"new")
    (out / "study.json").write_text("{}")
    log({"message": "fake"})
    return {"seconds": 0.0}


def earlier_study(folder):
    folder.mkdir()
    for name in ("table.md", "turntable_sdi_duck.gif", "study.json"):  # the duck: a scene the new study lacks
        (folder / name).write_text("old")
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_an_earlier_study_is_kept_without_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(testbed_cli, "run_study", fake_study)
    out = tmp_path / "study"
    before = earlier_study(out)
    assert main(["testbed", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "another --out" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert not (tmp_path / ".study.partial").exists()


def test_overwrite_replaces_the_study_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(testbed_cli, "run_study", fake_study)
    out = tmp_path / "study"
    earlier_study(out)
    assert main(["testbed", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "study.json", "table.md", "turntable_sds_mug.gif"]
    assert (out / "table.md").read_text() == "| new |\n"  # the stale duck GIF is gone
    assert json.loads((out / "log.jsonl").read_text())["message"] == "fake"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]  # no staging or replaced folder left
    assert main(["testbed", "--out", str(out), "--overwrite"]) == 0  # rerunnable, as `make demo` must be


def test_no_progress_silences_the_study_but_not_its_log(tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(testbed_cli, "run_study", lambda *a, progress=True, **k: asked.append(progress)
                        or fake_study(*a, **k))
    assert main(["testbed", "--out", str(tmp_path / "study"), "--no-progress"]) == 0
    assert asked == [False] and json.loads((tmp_path / "study" / "log.jsonl").read_text())["message"] == "fake"


def test_overwrite_refuses_a_folder_that_is_not_a_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(testbed_cli, "run_study", fake_study)
    out = tmp_path / "runs"
    earlier_study(out)
    (out / "notes.txt").write_text("mine")
    (out / "a-run").mkdir()
    assert main(["testbed", "--out", str(out), "--overwrite"]) == 2
    assert "a-run/, notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "a-run").is_dir()


def test_an_interrupted_or_failed_study_leaves_the_earlier_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    before = earlier_study(out)
    for error, code in ((KeyboardInterrupt, 130), (ValueError("image_size must be"), 2)):
        def broken(settings, folder, progress=True, log=None, workers=None, error=error):
            (folder / "table.md").write_text("half")
            raise error

        monkeypatch.setattr(testbed_cli, "run_study", broken)
        assert main(["testbed", "--out", str(out), "--overwrite"]) == code
        assert {p.name: p.read_text() for p in out.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


def test_a_short_sds_run_beats_the_initial_blob_in_its_views():  # 3D IoU: the next test
    """The testbed's reason to exist: distillation with the exact prior must move toward the truth."""
    import torch

    from mvsdi.testbed.prior import IdealDenoiserPrior
    from mvsdi.testbed.cells import initial_metrics, run_cell
    from mvsdi.testbed.settings import SMALL, cell_config

    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=SMALL.references, image_size=SMALL.image_size, device=cpu)
    start = initial_metrics(SMALL, prior, "mug", 0, cpu)
    end = run_cell(prior, cell_config(SMALL, "sds", METHODS[0], "mug", 0), (1.0,), cpu).rows[-1]
    assert not end["diverged"]
    assert end["r_precision"] > start["r_precision"]
    assert end["psnr"] > start["psnr"] + 1.0
    assert end["janus"] < start["janus"]
    SHORT_SDS_RUN.update(start=start, end=end, prior=prior)


SHORT_SDS_RUN: dict = {}


def test_a_short_sds_run_beats_the_initial_blob_in_3d_iou():
    """issue 15: with threestudio's jitter in the training views but not in the references, this run
    ended at IoU 0.39 against the blob's 0.48; with the views drawn from the references' cameras
    (prior.TESTBED_CAMERAS) and 256 references per scene it ends at 0.533."""
    if not SHORT_SDS_RUN:
        pytest.skip("needs test_a_short_sds_run_beats_the_initial_blob_in_its_views to have run first")
    assert SHORT_SDS_RUN["end"]["iou"] > SHORT_SDS_RUN["start"]["iou"]


def test_quality_does_not_fall_from_a_shorter_to_a_longer_run():
    """issue 15: an instrument whose reconstructions get worse with budget cannot rank methods. The
    same cell at a third of the budget must end with a lower 3D IoU than the short run above and
    not a clearly higher aligned PSNR. Measured (mug, seed 0): 32 → 96 evaluations gave IoU
    0.402 → 0.533 and PSNR 21.84 → 23.62 dB; before the fix 0.398 → 0.394 and 23.38 → 23.17
    (fails both). Longer runs, too slow for the suite: docs/testbed.md, issue 15."""
    import dataclasses

    import torch

    from mvsdi.testbed.cells import run_cell
    from mvsdi.testbed.settings import SMALL, cell_config

    if not SHORT_SDS_RUN:
        pytest.skip("needs test_a_short_sds_run_beats_the_initial_blob_in_its_views to have run first")
    shorter_settings = dataclasses.replace(SMALL, budgets=(SMALL.budget // 3,))
    shorter = run_cell(SHORT_SDS_RUN["prior"], cell_config(shorter_settings, "sds", METHODS[0], "mug", 0), (1.0,),
                       torch.device("cpu")).rows[-1]
    longer = SHORT_SDS_RUN["end"]
    assert longer["iou"] > shorter["iou"]
    assert longer["psnr"] >= shorter["psnr"] - PSNR_NOISE_DB


PSNR_NOISE_DB = 0.2  # a chosen tolerance: one seed's aligned PSNR moves by a few tenths of a dB between nearby budgets


def test_the_results_do_not_depend_on_the_number_of_workers(tmp_path):
    """Cells run on one thread each, in this process or in forked workers: the same numbers either way.
    CW-MV-SDI runs as a study method (its consensus weighting reaches the cell's config)."""
    import dataclasses

    from mvsdi.testbed.settings import cell_config

    settings = dataclasses.replace(TINY, methods=("K1", "CW-K2"), budgets=(4, 8), variance_repeats=0)
    assert cell_config(settings, "sds", METHODS[-1], "mug", 0).aggregation.kind == "consensus"
    lines = {}
    for workers, start in ((1, None), (2, None), (2, "spawn")):  # spawn: as on a GPU, the prior sent to the workers
        run_study(settings, tmp_path / str(workers), progress=False, workers=workers, start_method=start)
        lines[workers, start] = (tmp_path / str(workers) / "results.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_seconds"}  # noqa: E731
    found = {key: [strip(x) for x in text] for key, text in lines.items()}
    assert found[1, None] == found[2, None] == found[2, "spawn"]
    rows = [strip(x) for x in lines[1, None]]
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in ("K1", "CW-K2") for b in (4, 8)}
    assert (tmp_path / "1" / "metrics_vs_budget_axis.png").exists()  # two budgets: the budget-axis plot
    assert not (tmp_path / "1" / "variance.json").read_text().strip("[] \n")  # no variance asked for
    # CW-K2 at budget 8 takes 4 steps, as K1 at budget 4: the equal-steps comparison pairs them
    table = (tmp_path / "1" / "table.md").read_text()
    assert "At equal optimiser steps" in table and "| sds | 4 | CW-K2 | 1 |" in table


def test_the_tables_can_be_rewritten_from_a_studys_results(tmp_path):
    import runpy
    import sys

    run_study(TINY, tmp_path, progress=False, workers=1)
    written = (tmp_path / "table.md").read_text()
    (tmp_path / "table.md").unlink()
    script = runpy.run_path("benchmarks/testbed_tables.py")
    sys_argv, sys.argv = sys.argv, ["testbed_tables.py", str(tmp_path)]
    try:
        assert script["main"]() == 0
    finally:
        sys.argv = sys_argv
    assert (tmp_path / "table.md").read_text() == written
