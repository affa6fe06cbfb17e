"""A testbed study under a time limit: blocks of one scene and seed, scenes first, a block started
only when it is predicted to end in time; a cut study is a sized result (exit 0), not a failure.
A study stopped by Ctrl-C keeps its complete blocks (exit 130)."""

import dataclasses
import json

import pytest

from mvsdi.cli import main
from mvsdi.field import FieldConfig
from mvsdi.testbed import cli as testbed_cli
from mvsdi.testbed import study as study_module
from mvsdi.testbed.cells import Deadline, gpu_workers, study_blocks
from mvsdi.testbed.settings import FULL, StudySettings, output_reserve_seconds
from mvsdi.testbed.study import run_study

# two blocks (mug, duck × seed 0) of two methods, the variance meter on each first-seed K1 run
TWO_BLOCKS = StudySettings(scenes=("mug", "duck"), seeds=(0,), guidances=("sds",), budgets=(8,), image_size=16,
                           references=16, samples_per_ray=12, fractions=(1.0,), variance_repeats=3,
                           variance_fractions=(0.0, 1.0), methods=("K1", "K2-antipodal"),
                           field=FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0,
                                             hidden_dim=16))
# the reserve exactly: the first block always starts (nothing is measured before a cell ends), and
# after it no time is left for another
ONE_BLOCK = dataclasses.replace(TWO_BLOCKS, time_limit_minutes=output_reserve_seconds(TWO_BLOCKS) / 60 + 1e-9)


def rows_of(folder):
    """results.jsonl without the cells' wall times (which differ between runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"}
            for line in (folder / "results.jsonl").read_text().splitlines()]


def test_blocks_run_scenes_first():
    settings = dataclasses.replace(TWO_BLOCKS, scenes=("mug", "duck", "car"), seeds=(4, 1))
    assert study_blocks(settings) == [("mug", 4), ("duck", 4), ("car", 4), ("mug", 1), ("duck", 1), ("car", 1)]
    assert study_blocks(FULL)[:8] == [(scene, 0) for scene in FULL.scenes]


def test_a_limit_that_admits_one_block_runs_one_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(testbed_cli, "settings_from_args", lambda args: ONE_BLOCK)
    out = tmp_path / "study"
    assert main(["testbed", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "the time limit stopped the study after 1 of 2 blocks" in printed
    table = (out / "table.md").read_text()
    assert table.startswith("Blocks that ran: time limit: 1 of 2 blocks")
    assert {(r["scene"], r["seed"]) for r in rows_of(out)} == {("mug", 0)}
    assert {r["method"] for r in rows_of(out)} == {"K1", "K2-antipodal"}  # the block is whole: K1 and its pair
    assert "| sds | 8 | K2-antipodal | 1 |" in table  # one pair, within the block
    log = [json.loads(line)["message"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(m.startswith("time limit: 1 of 2 blocks") for m in log)
    assert any("gradient variance: measured on 1 of 2 scenes (mug)" in m for m in log)
    assert {v["scene"] for v in json.loads((out / "variance.json").read_text())} == {"mug"}
    assert json.loads((out / "study.json").read_text())["blocks"] | {"coverage": None} == {
        "ran": 1, "of": 2, "stopped_by_time_limit": True, "interrupted": False, "coverage": None}
    assert sorted(p.name for p in out.glob("turntable_*.gif")) == ["turntable_sds_mug.gif"]


def test_a_generous_limit_runs_every_block_with_the_results_of_no_limit(tmp_path, monkeypatch):
    written = []
    real = study_module.atomic_write_bytes

    def record(path, data):
        if path.name == "results.jsonl":
            written.append(data.decode().splitlines())
        real(path, data)

    monkeypatch.setattr(study_module, "atomic_write_bytes", record)
    run_study(dataclasses.replace(TWO_BLOCKS, time_limit_minutes=60.0), tmp_path / "limit", progress=False, workers=1)
    assert [len(lines) for lines in written] == [4, 8]  # as each block completes: 2 methods × (initial, end)
    run_study(TWO_BLOCKS, tmp_path / "none", progress=False, workers=1)
    assert rows_of(tmp_path / "limit") == rows_of(tmp_path / "none")
    assert len(rows_of(tmp_path / "none")) == 8
    for name in ("variance.json", "table.csv"):
        assert (tmp_path / "limit" / name).read_text() == (tmp_path / "none" / name).read_text()
    limited, unlimited = ((tmp_path / d / "table.md").read_text() for d in ("limit", "none"))
    assert limited.startswith("Blocks that ran: all 2 blocks within the time limit (60 min;")
    assert limited.endswith(unlimited) and not unlimited.startswith("Blocks")


def test_a_limit_below_the_reserve_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["testbed", "--out", str(out), "--time-limit", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "time limit 0.05 min: give at least" in err and "tables, plots and turntables" in err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()
    assert main(["testbed", "--out", str(out), "--time-limit", "-1"]) == 2
    assert "at least 0" in capsys.readouterr().err


def test_the_full_setting_has_a_limit_of_8_minutes_that_0_lifts():
    import argparse

    parser = argparse.ArgumentParser()
    testbed_cli.add_parser(parser.add_subparsers())
    assert testbed_cli.settings_from_args(parser.parse_args(["testbed", "--full"])).time_limit_minutes == 8.0
    lifted = parser.parse_args(["testbed", "--full", "--time-limit", "0"])
    assert testbed_cli.settings_from_args(lifted).time_limit_minutes is None
    small = parser.parse_args(["testbed", "--time-limit", "3"])
    assert testbed_cli.settings_from_args(small).time_limit_minutes == 3.0
    assert output_reserve_seconds(FULL) < 0.25 * 60 * 8  # the outputs leave most of the 8 minutes to the cells


def test_a_block_is_admitted_when_its_list_schedule_bound_ends_in_time():
    deadline = Deadline(end=7.5, workers=2)
    assert not deadline.fits(0.0, [], [1.0])  # nothing measured yet
    deadline.record(10.0, 5.0)  # 0.5 s per unit of expected cost
    deadline.record(0.0, 3.0)  # an initial field: no expected cost, not a rate
    # cells of 5 s and 5 s on 2 workers: 10 / 2 + (1 - 1/2) · 5 = 7.5 s
    assert deadline.fits(0.0, [], [10.0, 10.0])
    assert not deadline.fits(0.1, [], [10.0, 10.0])
    assert not deadline.fits(0.0, [2.0], [10.0, 10.0])  # behind an outstanding cell


@pytest.mark.parametrize("free,per_worker,cores,expected", [(10 * 2**30, 2 * 2**30, 16, 5), (None, 2**30, 4, 4),
                                                            (2**40, 2**30, 64, 16), (2**29, 2**30, 16, 1)])
def test_workers_that_share_a_gpu(free, per_worker, cores, expected):
    """As many as the free memory holds, at most one per core and 16, at least one."""
    assert gpu_workers(free, per_worker, cores) == expected


def test_a_workers_gpu_memory_counts_its_context_prior_chunk_and_training_view():
    import torch

    from mvsdi.testbed.cells import GPU_CONTEXT_BYTES, worker_gpu_bytes
    from mvsdi.testbed.prior import CHUNK_BYTES, IdealDenoiserPrior

    cpu = torch.device("cpu")  # the probe is the same on any device; the count is what is tested
    prior = IdealDenoiserPrior(n_references=TWO_BLOCKS.references, image_size=TWO_BLOCKS.image_size, device=cpu)
    found = worker_gpu_bytes(TWO_BLOCKS, prior, cpu)
    images = sum(len(prior.references(n)) for n in prior.scene_names) * 3 * 16 * 16 * 4  # float32
    assert found > GPU_CONTEXT_BYTES + CHUNK_BYTES + images
    assert found < GPU_CONTEXT_BYTES + CHUNK_BYTES + 2**28  # a 16² cell and prior: well under 256 MiB more


def interrupt_after_the_first_block(monkeypatch):
    """Ctrl-C right after the first block's results.jsonl is written (the study's outputs follow)."""
    real = study_module.atomic_write_bytes
    pressed = []

    def write_then_interrupt(path, data):
        real(path, data)
        if path.name == "results.jsonl" and not pressed:
            pressed.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "atomic_write_bytes", write_then_interrupt)
    monkeypatch.setattr(testbed_cli, "settings_from_args", lambda args: TWO_BLOCKS)


def test_ctrl_c_after_a_block_keeps_its_results_and_tables(tmp_path, monkeypatch, capsys):
    interrupt_after_the_first_block(monkeypatch)
    out = tmp_path / "study"
    assert main(["testbed", "--out", str(out), "--workers", "1"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 1 of 2 blocks (scene × seed): their results, tables and turntables are in {out}" in err
    assert len({(r["scene"], r["seed"]) for r in rows_of(out)}) == 1
    assert {r["method"] for r in rows_of(out)} == {"K1", "K2-antipodal"}
    assert (out / "table.md").read_text().startswith("Blocks that ran: interrupted (Ctrl-C): 1 of 2 blocks")
    blocks = json.loads((out / "study.json").read_text())["blocks"]
    assert blocks["interrupted"] and not blocks["stopped_by_time_limit"] and blocks["ran"] == 1
    assert len(list(out.glob("turntable_*.gif"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


def test_ctrl_c_after_a_block_does_not_replace_an_earlier_study(tmp_path, monkeypatch, capsys):
    interrupt_after_the_first_block(monkeypatch)
    out = tmp_path / "study"
    out.mkdir()
    (out / "table.md").write_text("old")
    assert main(["testbed", "--out", str(out), "--workers", "1", "--overwrite"]) == 130
    staged = tmp_path / ".study.partial"
    assert f"their results and tables are in {staged}; {out} was left as it was" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["table.md"] and (out / "table.md").read_text() == "old"
    assert (staged / "table.md").read_text().startswith("Blocks that ran: interrupted (Ctrl-C): 1 of 2 blocks")


def test_ctrl_c_before_any_block_completes_keeps_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(testbed_cli, "settings_from_args", lambda args: TWO_BLOCKS)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "_say_finished", interrupt)
    assert main(["testbed", "--out", str(tmp_path / "study"), "--workers", "1"]) == 130
    assert "the partial study is discarded" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
