"""The testbed study end to end on a tiny setting, and its bad input."""

import json

import imageio.v3 as iio
import pytest

from mvsdi.cli import main
from mvsdi.field import FieldConfig
from mvsdi.testbed.study import METHODS, StudySettings, mean_interval, run_study, summarise

TINY = StudySettings(scenes=("mug",), seeds=(0,), guidances=("sds",), budget=8, image_size=16, references=16,
                     samples_per_ray=12, fractions=(1.0,), variance_repeats=2,
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
    assert variance[0]["method"] == "K1" and variance[0]["ratio"] == 1.0
    gif = iio.imread(tmp_path / "turntable_sds_mug.gif")
    assert gif.shape[0] == 50 and gif.shape[1] == 128 and gif.shape[2] == 128 * (len(METHODS) + 1)  # truth + methods


def test_summary_statistics():
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.303 * 1.0 / 3 ** 0.5))
    rows = [{"guidance": "sds", "scene": "a", "seed": s, "method": m, "fraction": 1.0, "diverged": False,
             "r_precision": 1.0, "psnr": base + (1.0 if m == "K2-antipodal" else 0.0), "iou": 0.5, "janus": 0.0}
            for s, base in ((0, 20.0), (1, 25.0)) for m in ("K1", "K2-antipodal")]
    table = {r["method"]: r for r in summarise(rows)}
    assert table["K2-antipodal"]["psnr_vs_K1"] == (1.0, 0.0)  # paired: the seeds' offsets cancel
    assert table["K2-antipodal"]["psnr"][0] == 23.5


@pytest.mark.parametrize("args,message", [(["--scenes", "teapot"], "teapot"), (["--budget", "6"], "multiple of 4"),
                                          (["--guidance", "vsd"], "unknown guidance"), (["--seeds", "0"], ">= 1")])
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
    rows, _ = run_cell(prior, cell_config(SMALL, "sds", METHODS[0], "mug", 0), (1.0,), cpu)
    end = rows[-1]
    assert not end["diverged"]
    assert end["r_precision"] > start["r_precision"]
    assert end["psnr"] > start["psnr"] + 1.0
    assert end["iou"] > start["iou"]
    assert end["janus"] < start["janus"]
