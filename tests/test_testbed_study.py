"""The testbed study end to end on a tiny setting, and its bad input."""

import json
import math

import imageio.v3 as iio
import pytest

from mvsdi.cli import main
from mvsdi.field import FieldConfig
from mvsdi.testbed.study import (METHODS, StudySettings, mean_interval, run_study, summarise, variance_markdown,
                                 variance_rows, variance_summary)

TINY = StudySettings(scenes=("mug",), seeds=(0,), guidances=("sds",), budget=8, image_size=16, references=16,
                     samples_per_ray=12, fractions=(1.0,), variance_repeats=3, variance_fractions=(0.0, 1.0),
                     field=FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0,
                                       hidden_dim=16))


def test_study_writes_tables_plots_and_turntables(tmp_path):
    result = run_study(TINY, tmp_path, progress=False)
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
    assert gif.shape[0] == 50 and gif.shape[1] == 128 and gif.shape[2] == 128 * (len(METHODS) + 1)  # truth + methods


def test_the_variance_at_the_start_of_the_run_is_the_estimator_at_the_initial_field():
    import torch

    from mvsdi.distill import Distiller, Model
    from mvsdi.testbed.prior import IdealDenoiserPrior
    from mvsdi.testbed.study import cell_config, run_cell
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


def test_summary_statistics():
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.303 * 1.0 / 3 ** 0.5))
    rows = [{"guidance": "sds", "scene": "a", "seed": s, "method": m, "fraction": 1.0, "diverged": False,
             "r_precision": 1.0, "psnr": base + (1.0 if m == "K2-antipodal" else 0.0), "iou": 0.5, "janus": 0.0}
            for s, base in ((0, 20.0), (1, 25.0)) for m in ("K1", "K2-antipodal")]
    table = {r["method"]: r for r in summarise(rows)}
    assert table["K2-antipodal"]["psnr_vs_K1"] == (1.0, 0.0)  # paired: the seeds' offsets cancel
    assert table["K2-antipodal"]["psnr"][0] == 23.5


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


@pytest.mark.parametrize("args,message", [(["--scenes", "teapot"], "teapot"), (["--budget", "6"], "multiple of 4"),
                                          (["--guidance", "vsd"], "unknown guidance"), (["--seeds", "0"], ">= 1"),
                                          (["--variance-repeats", "1"], "two draws")])
def test_bad_testbed_input(args, message, tmp_path, capsys):
    assert main(["testbed", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_short_sds_run_beats_the_initial_blob_on_every_metric():
    """The testbed's reason to exist: distillation with the exact prior must move toward the truth."""
    import torch

    from mvsdi.testbed.prior import IdealDenoiserPrior
    from mvsdi.testbed.study import SMALL, cell_config, initial_metrics, run_cell

    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=SMALL.references, image_size=SMALL.image_size, device=cpu)
    start = initial_metrics(SMALL, prior, "mug", 0, cpu)
    end = run_cell(prior, cell_config(SMALL, "sds", METHODS[0], "mug", 0), (1.0,), cpu).rows[-1]
    assert not end["diverged"]
    assert end["r_precision"] > start["r_precision"]
    assert end["psnr"] > start["psnr"] + 1.0
    assert end["iou"] > start["iou"]
    assert end["janus"] < start["janus"]
