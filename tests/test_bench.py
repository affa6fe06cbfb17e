"""`mvsdi bench`: the matrix end to end on the weights-free ideal prior, resuming, failures, the
aggregation's statistics on known numbers, bad inputs, and the Ray executor on a local instance."""

import csv
import json
import math
import shutil
import socket

import imageio.v3 as iio
import numpy as np
import pytest

from mvsdi.bench import aggregate as agg
from mvsdi.bench.matrix import BenchSpec, cells, redo_reason
from mvsdi.cli import main

TINY = ["--model", "ideal:16", "--budget", "2", "--resolution", "16", "--samples-per-ray", "8", "--eval-views", "4",
        "--eval-resolution", "16", "--device", "cpu", "--iou-resolution", "16"]


def prompt_file(tmp_path, *lines, name="prompts.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def records(out):
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """2 presets × 2 scenes × 1 seed, run once for the tests that read its outputs."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    argv = ["bench", "--presets", "sds,mvsds-k2", "--prompts", str(prompt_file(root, "mug", "duck")), *TINY,
            "--out", str(out)]
    assert main(argv) == 0
    return out, argv


def test_end_to_end_tables_plots_and_gallery(bench):
    out, _ = bench
    summary = read_csv(out / "summary.csv")
    assert [r["preset"] for r in summary] == ["sds", "mvsds-k2"]
    for row in summary:
        assert (row["cells"], row["ok"], row["failed"], row["missing"]) == ("2", "2", "0", "0")
        assert float(row["guidance_evaluations"]) == 2  # the budget, whatever K is
        assert float(row["peak_memory_gib"]) > 0
        for metric in ("psnr", "iou", "r_precision", "janus"):
            assert math.isfinite(float(row[f"{metric}_mean"]))
    for preset in ("sds", "mvsds-k2"):
        per_cell = read_csv(out / "tables" / f"{preset}.csv")
        assert [(r["prompt"], r["seed"], r["status"]) for r in per_cell] == [("mug", "0", "ok"), ("duck", "0", "ok")]
        assert (out / "tables" / f"{preset}.md").read_text().count("| mug | 0 | ok |") == 1
        measured = json.loads((out / preset / "mug" / "s0" / "bench_metrics.json").read_text())
        assert set(measured["metrics"]) == {"psnr", "iou", "r_precision", "janus"}
        assert float(per_cell[0]["psnr"]) == pytest.approx(measured["metrics"]["psnr"])
    paired = read_csv(out / "paired.csv")
    assert [(r["preset"], r["metric"], r["pairs"]) for r in paired] == [
        ("mvsds-k2", m, "2") for m in ("psnr", "iou", "r_precision", "janus")]
    assert {r["cell"] for r in records(out)} == {f"{p}/{s}/s0" for p in ("sds", "mvsds-k2") for s in ("mug", "duck")}
    assert (out / "plots" / "metrics.png").stat().st_size > 0 and (out / "plots" / "per_prompt.png").stat().st_size > 0
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<video") == 4 and 'src="mvsds-k2/duck/s0/turntable.mp4"' in gallery
    assert 'poster="posters/mvsds-k2/duck/s0.png"' in gallery  # shown before (or without) playback
    first = iio.imread(out / "mvsds-k2" / "duck" / "s0" / "turntable.mp4", index=0)
    assert iio.imread(out / "posters" / "mvsds-k2" / "duck" / "s0.png").shape == first.shape
    psnr = json.loads((out / "mvsds-k2" / "duck" / "s0" / "bench_metrics.json").read_text())["metrics"]["psnr"]
    assert gallery.count("<div class=metrics>psnr ") == 4 and f"psnr {psnr:.3g} · iou" in gallery
    assert "Paired differences against sds" in (out / "summary.md").read_text()


def test_rerun_skips_done_cells_and_aggregate_only_rebuilds_the_tables(bench, monkeypatch, capsys):
    out, argv = bench
    import mvsdi.generate

    def no_generate(*args, **kwargs):
        raise AssertionError("a done cell was generated again")

    monkeypatch.setattr(mvsdi.generate, "generate", no_generate)
    cell_files = sorted(p for p in out.rglob("*") if p.is_file() and "/s0/" in str(p))
    mtimes = {p: p.stat().st_mtime_ns for p in cell_files}
    lines_before = len(records(out))
    assert main(argv) == 0
    assert "4 cells, 4 done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cell_files} == mtimes
    assert len(records(out)) == lines_before

    before = (out / "summary.csv").read_text()
    (out / "summary.csv").unlink()
    assert main(["bench", "--aggregate-only", str(out)]) == 0
    assert (out / "summary.csv").read_text() == before


def test_a_run_with_another_config_or_status_is_redone_and_says_why(bench, tmp_path):
    out, _ = bench
    spec = BenchSpec(presets=("sds",), prompts=("mug",), seeds=(0,),
                     overrides={"model": "ideal:16", "budget": 2, "resolution": 16, "samples_per_ray": 8,
                                "eval_views": 4, "eval_resolution": 16, "device": "cpu"})
    shutil.copytree(out / "sds", tmp_path / "sds")
    cell = cells(spec, tmp_path)[0]
    assert redo_reason(cell) is None
    config = json.loads((cell.path / "config.json").read_text())
    (cell.path / "config.json").write_text(json.dumps({**config, "budget": 4}))
    assert "differs in: budget" in redo_reason(cell)
    summary = json.loads((cell.path / "summary.json").read_text())
    (cell.path / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert "'interrupted'" in redo_reason(cell)
    shutil.rmtree(cell.path / "renders")
    assert redo_reason(cells(spec, tmp_path / "nowhere")[0]) == "not run yet"


def test_an_interrupted_run_is_resumed_from_its_checkpoint(bench, tmp_path, monkeypatch):
    """`generate.resume` continues a run committed as "interrupted" with the cell's config; when it
    cannot (no usable checkpoint), the cell is trained again from the start."""
    import mvsdi.generate
    from mvsdi.bench.cells import EvalSettings, run_cell
    from mvsdi.rundir import RunDirectoryError

    out, _ = bench
    shutil.copytree(out / "sds" / "mug", tmp_path / "sds" / "mug")
    spec = BenchSpec(presets=("sds",), prompts=("mug",), seeds=(0,),
                     overrides={"model": "ideal:16", "budget": 2, "resolution": 16, "samples_per_ray": 8,
                                "eval_views": 4, "eval_resolution": 16, "device": "cpu"})
    (cell,) = cells(spec, tmp_path)
    summary_file = cell.path / "summary.json"
    completed = summary_file.read_text()
    calls = []

    def finish(name, path):  # stands in for training: the run ends "completed"
        calls.append((name, path))
        summary_file.write_text(completed)
        return path

    def resume(path, **kwargs):
        return finish("resume", path)

    def cannot_resume(path, **kwargs):
        calls.append(("resume", path))
        raise RunDirectoryError("no checkpoint")

    monkeypatch.setattr(mvsdi.generate, "generate", lambda config, path, **kwargs: finish("generate", path))
    settings = EvalSettings.from_dict(json.loads((cell.path / "bench_metrics.json").read_text())["settings"])
    cases = ((resume, [("resume", cell.path)], "resumed"),
             (cannot_resume, [("resume", cell.path), ("generate", cell.path)], "generated"))
    for fake, expected_calls, status in cases:
        monkeypatch.setattr(mvsdi.generate, "resume", fake)
        summary_file.write_text(json.dumps({**json.loads(completed), "status": "interrupted"}))
        calls.clear()
        assert run_cell(cell, settings, retries=0)["status"] == status
        assert calls == expected_calls


def test_a_failing_cell_is_retried_then_recorded_as_failed(tmp_path, monkeypatch, capsys):
    import mvsdi.generate

    calls = []

    def broken_generate(config, out, **kwargs):
        calls.append(config.prompt)
        raise RuntimeError(f"boom {len(calls)}")

    monkeypatch.setattr(mvsdi.generate, "generate", broken_generate)
    out = tmp_path / "out"
    argv = ["bench", "--presets", "sds", "--prompts", str(prompt_file(tmp_path, "mug")), *TINY, "--out", str(out),
            "--retries", "2"]
    assert main(argv) == 0
    assert calls == ["mug"] * 3
    (record,) = records(out)
    assert (record["cell"], record["status"], record["attempts"]) == ("sds/mug/s0", "failed", 3)
    assert record["error"] == "RuntimeError: boom 3"
    (row,) = read_csv(out / "summary.csv")
    assert (row["failed"], row["ok"], float(row["divergence_rate"])) == ("1", "0", 1.0)
    assert read_csv(out / "tables" / "sds.csv")[0]["reason"] == "RuntimeError: boom 3"
    assert "failed" in (out / "gallery.html").read_text()
    assert "1 cell(s) failed" in capsys.readouterr().out


def test_stable_diffusion_cells_get_the_clip_metrics(tiny_clip, tmp_path):
    """The Stable Diffusion path: a tiny random SD stack, and the CLIP metrics on a tiny random CLIP."""
    out = tmp_path / "out"
    argv = ["bench", "--presets", "sds", "--prompts", str(prompt_file(tmp_path, "a red apple")), "--model", "tiny",
            "--budget", "2", "--resolution", "16", "--samples-per-ray", "8", "--eval-views", "4",
            "--eval-resolution", "16", "--device", "cpu", "--clip-b32", str(tiny_clip), "--clip-b16", str(tiny_clip),
            "--out", str(out)]
    assert main(argv) == 0
    run = out / "sds" / "a-red-apple" / "s0"
    detailed = json.loads((run / "metrics.json").read_text())  # mvsdi eval's file, kept beside the bench's
    measured = json.loads((run / "bench_metrics.json").read_text())
    assert measured["metrics"]["clip_score"] == pytest.approx(detailed["metrics"]["clip_score"]["mean"])
    assert measured["metrics"]["r_precision"] == 1.0  # the only candidate prompt is the run's own
    assert measured["diverged"] == detailed["divergence"]["diverged"]
    (row,) = read_csv(out / "tables" / "sds.csv")
    assert list(row)[3:10] == ["clip_score", "r_precision", "clip_iqa_quality", "clip_iqa_real", "clip_iqa_sharpness",
                               "janus", "guidance_evaluations"]
    assert row["status"] == ("diverged" if measured["diverged"] else "ok")


# ---------------------------------------------------------------------------------------------
# aggregation statistics on known numbers


def row(preset, prompt, status="ok", seed=0, **metrics):
    return {"preset": preset, "prompt": prompt, "seed": seed, "status": status, "reason": "", "metrics": metrics,
            "path": f"{preset}/{prompt}/s{seed}", "guidance_evaluations": 10, "unet_calls": 20, "train_seconds": 1.5,
            "peak_memory_gib": 2.0 if preset == "a" else 3.0}


def test_summary_means_intervals_and_divergence_rate():
    rows = [row("a", "p1", psnr=1.0), row("a", "p2", psnr=2.0), row("a", "p3", psnr=3.0),
            row("a", "p4", status="failed"), row("b", "p1", psnr=5.0), row("b", "p2", status="diverged", psnr=99.0)]
    a, b = agg.summarise(rows, ["a", "b"], ["psnr"])
    assert (a["cells"], a["ok"], a["failed"], a["divergence_rate"]) == (4, 3, 1, 0.25)
    mean, half = a["psnr"]
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.302653 / math.sqrt(3))  # t(0.975, 2) · s / √n
    assert b["psnr"][0] == 5.0 and math.isnan(b["psnr"][1])  # the diverged 99 is out; one value: no interval
    assert (b["divergence_rate"], b["peak_memory_gib"], b["unet_calls"]) == (0.5, 3.0, 20)


def test_error_bars_stop_at_the_metric_s_range():
    """An IoU of 0.4 ± 1.1 over 2 cells was drawn from −0.7 to 1.5; the bars end at 0 and 1."""
    from mvsdi.bench.plots import clipped_error_bars, metric_range

    assert metric_range("iou", ideal=True) == (0.0, 1.0) and metric_range("psnr", ideal=True) == (0.0, None)
    assert metric_range("clip_iqa_quality", ideal=False) == (0.0, 1.0) and metric_range("janus", ideal=False) == (-1, 1)
    assert metric_range("image_reward", ideal=False) == (None, None)
    bars = clipped_error_bars([0.4, 0.5, 30.0], [1.1, math.nan, 40.0], (0.0, 1.0))
    assert np.allclose(bars, [[0.4, 0.0, 30.0], [0.6, 0.0, 0.0]], rtol=0, atol=1e-12)  # [below, above]; nan: none
    assert np.allclose(clipped_error_bars([30.0], [40.0], (0.0, None)), [[30.0], [40.0]], rtol=0, atol=1e-12)


def test_paired_differences_use_only_pairs_where_neither_diverged():
    rows = [row("a", "p1", psnr=1.0), row("a", "p2", psnr=2.0), row("a", "p3", status="diverged", psnr=0.0),
            row("a", "p4", psnr=4.0),
            row("b", "p1", psnr=2.0), row("b", "p2", psnr=4.0), row("b", "p3", psnr=9.0),
            row("b", "p4", status="failed")]
    (diff,) = agg.paired_differences(rows, "a", ["a", "b"], ["psnr"])
    assert (diff["preset"], diff["pairs"]) == ("b", 2)
    assert diff["mean_difference"] == pytest.approx(1.5)  # (2−1, 4−2)
    assert diff["ci95"] == pytest.approx(12.706205 * math.sqrt(0.5) / math.sqrt(2))  # t(0.975, 1)


# ---------------------------------------------------------------------------------------------
# the reference protocol: means over the prompts valid for both presets


def test_reference_means_are_over_prompts_valid_for_every_preset():
    rows = [row("a", "p1", psnr=1.0), row("a", "p2", psnr=2.0), row("a", "p3", psnr=3.0),
            row("a", "p4", status="diverged", psnr=50.0),
            row("b", "p1", psnr=5.0), row("b", "p2", status="diverged", psnr=99.0), row("b", "p3", psnr=7.0),
            row("b", "p4", psnr=8.0)]
    scored = agg.valid_for_all(rows, ["a", "b"])
    assert scored == {("p1", 0), ("p3", 0)}
    a, b = agg.summarise(rows, ["a", "b"], ["psnr"], scored)
    assert a["psnr"][0] == pytest.approx(2.0) and b["psnr"][0] == pytest.approx(6.0)  # (1+3)/2, (5+7)/2
    assert (a["divergence_rate"], b["divergence_rate"]) == (0.25, 0.25)  # still over every cell
    ours_a, ours_b = agg.summarise(rows, ["a", "b"], ["psnr"])  # ours: each preset's own ok cells
    assert ours_a["psnr"][0] == pytest.approx(2.0) and ours_b["psnr"][0] == pytest.approx(20 / 3)
    (diff,) = agg.paired_differences(rows, "a", ["a", "b"], ["psnr"])
    assert (diff["pairs"], diff["baseline_mean"], diff["preset_mean"], diff["mean_difference"]) == (2, 2.0, 6.0, 4.0)


def reference_bench(root, spec, measured):
    """Done cells of a Stable Diffusion bench without training: config, summary and renders as a finished
    run has them, and ``metrics_reference.json`` from ``measured[(preset, prompt)]`` (absent: not evaluated)."""
    import mvsdi

    for cell in cells(spec, root):
        (cell.path / "renders").mkdir(parents=True)
        (cell.path / "config.json").write_text(json.dumps(cell.config.to_dict()))
        summary = {"status": "completed", "versions": {"mvsdi": mvsdi.__version__}, "guidance_evaluations": 2,
                   "unet_calls": 4, "train_seconds": 1.0}
        (cell.path / "summary.json").write_text(json.dumps(summary))
        for i in range(cell.config.eval_views):
            iio.imwrite(cell.path / "renders" / f"{i:03d}.png", np.full((8, 8, 3), 128, np.uint8))
        if (cell.preset, cell.prompt) in measured:
            clip, diverged = measured[(cell.preset, cell.prompt)]
            (cell.path / "metrics_reference.json").write_text(json.dumps(
                {"protocol": "reference", "divergence": {"diverged": diverged, "reason": "26 of 50 views are degenerate"
                                                         if diverged else None},
                 "metrics": {"clip_score": {"mean": clip, "per_view": [clip]}}}))


def test_aggregate_under_the_reference_protocol_writes_beside_ours(tmp_path):
    spec = BenchSpec(presets=("sds", "mvsds-k2"), prompts=("a cat", "a dog", "a cow"), seeds=(0,),
                     overrides={"model": "tiny", "budget": 2, "eval_views": 2, "device": "cpu"})
    measured = {("sds", "a cat"): (0.30, False), ("sds", "a dog"): (0.20, False), ("sds", "a cow"): (0.9, True),
                ("mvsds-k2", "a cat"): (0.34, False), ("mvsds-k2", "a dog"): (0.9, True)}  # a cow: not evaluated
    reference_bench(tmp_path, spec, measured)
    result = agg.aggregate(spec, tmp_path, protocol="reference")
    assert result["protocol"] == "reference"
    summary = {r["preset"]: r for r in read_csv(tmp_path / "reference" / "summary.csv")}
    # only "a cat" is valid for both presets
    assert float(summary["sds"]["clip_score_mean"]) == pytest.approx(0.30)
    assert float(summary["mvsds-k2"]["clip_score_mean"]) == pytest.approx(0.34)
    assert (summary["sds"]["ok"], summary["mvsds-k2"]["ok"], summary["mvsds-k2"]["missing"]) == ("2", "1", "1")
    (paired,) = read_csv(tmp_path / "reference" / "paired.csv")
    assert (paired["pairs"], float(paired["baseline_mean"]), float(paired["preset_mean"])) == ("1", 0.30, 0.34)
    cow = next(r for r in result["rows"] if r["preset"] == "mvsds-k2" and r["prompt"] == "a cow")
    assert cow["status"] == "missing" and "mvsdi eval --protocol reference" in cow["reason"]
    report = (tmp_path / "reference" / "summary.md").read_text()
    assert "Reference protocol" in report and "over the 1 (prompt, seed) pairs" in report
    # ours is untouched: no tables, no gallery of its own were written by the reference's aggregation
    assert not (tmp_path / "summary.csv").exists() and not (tmp_path / "gallery.html").exists()

    with pytest.raises(ValueError, match="choose one of: ours, reference"):
        agg.aggregate(spec, tmp_path, protocol="theirs")
    ideal = BenchSpec(presets=("sds",), prompts=("mug",), seeds=(0,), overrides={"model": "ideal:16"})
    with pytest.raises(ValueError, match="testbed prior"):
        agg.aggregate(ideal, tmp_path, protocol="reference")


# ---------------------------------------------------------------------------------------------
# bad input


def bench_error(argv, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvsdi: error: ")
    return err


def test_bad_inputs_exit_2_with_the_reason(tmp_path, capsys):
    mug = str(prompt_file(tmp_path, "mug"))
    out = ["--out", str(tmp_path / "out")]
    assert "unknown preset(s) ['nope']" in bench_error(["--presets", "sds,nope", "--prompts", mug, *TINY, *out], capsys)
    assert "unknown metric(s) ['clip_score']" in bench_error(["--prompts", mug, "--metrics", "clip_score", *TINY, *out],
                                                            capsys)
    assert "unknown metric(s) ['sharpness']" in bench_error(["--model", "tiny", "--metrics", "sharpness", *out], capsys)
    blank = str(prompt_file(tmp_path, "mug", "", "duck", name="blank.txt"))
    assert "blank line(s) [2]" in bench_error(["--prompts", blank, *TINY, *out], capsys)
    twice = str(prompt_file(tmp_path, "mug", "duck", "Mug", name="twice.txt"))
    assert "line 3 repeats line 1" in bench_error(["--prompts", twice, *TINY, *out], capsys)
    cat = str(prompt_file(tmp_path, "a cat", name="cat.txt"))
    assert "testbed scene" in bench_error(["--prompts", cat, *TINY, *out], capsys)
    assert "K=4" in bench_error(["--presets", "sds,mvsds-k4", "--prompts", mug, *TINY, *out], capsys)
    assert "each once" in bench_error(["--prompts", mug, "--seeds", "0,1,1", *TINY, *out], capsys)
    assert "no readable bench.json" in bench_error(["--aggregate-only", str(tmp_path)], capsys)
    assert not (tmp_path / "out").exists()  # nothing was written for a bad command


def test_weights_that_cannot_be_loaded_stop_the_bench_with_the_loaders_message(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    err = bench_error(["--presets", "sds", "--prompts", str(prompt_file(tmp_path, "a cat")), "--model", str(missing),
                       "--budget", "2", "--resolution", "16", "--device", "cpu", "--out", str(tmp_path / "out")],
                      capsys)
    assert str(missing) in err


# ---------------------------------------------------------------------------------------------
# Ray


def test_missing_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = bench_error(["--presets", "sds", "--prompts", str(prompt_file(tmp_path, "mug")), *TINY, "--executor", "ray",
                       "--out", str(tmp_path / "out")], capsys)
    assert "pip install 'mvsdi[ray]'" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"
    err = bench_error(["--presets", "sds", "--prompts", str(prompt_file(tmp_path, "mug")), *TINY, "--executor", "ray",
                       "--address", address, "--out", str(tmp_path / "out")], capsys)
    assert f"no Ray cluster answers at {address}" in err
    assert not (tmp_path / "out").exists()


def test_ray_executor_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    argv = ["bench", "--presets", "mvsds-k2", "--prompts", str(prompt_file(tmp_path, "duck")), *TINY,
            "--executor", "ray", "--address", "local", "--out", str(out)]
    try:
        assert main(argv) == 0
    finally:
        ray.shutdown()
    (record,) = records(out)
    assert (record["cell"], record["status"]) == ("mvsds-k2/duck/s0", "generated")
    (row,) = read_csv(out / "tables" / "mvsds-k2.csv")
    assert row["status"] == "ok" and math.isfinite(float(row["psnr"]))


def test_local_executor_gives_each_worker_process_one_gpu(bench, tmp_path):
    """The multi-GPU path without GPUs: one spawned worker per listed device, pinned with
    CUDA_VISIBLE_DEVICES. The cells are done ones (device "auto"), so the workers only check them."""
    from mvsdi.bench.cells import EvalSettings
    from mvsdi.bench.executors import run_local

    out, _ = bench
    for preset in ("sds", "mvsds-k2"):
        shutil.copytree(out / preset / "mug", tmp_path / preset / "mug")
        config_file = tmp_path / preset / "mug" / "s0" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "device": "auto"}))
    stored = json.loads((tmp_path / "sds" / "mug" / "s0" / "bench_metrics.json").read_text())["settings"]
    settings = EvalSettings.from_dict(stored)
    spec = BenchSpec(presets=("sds", "mvsds-k2"), prompts=("mug",), seeds=(0,),
                     overrides={"model": "ideal:16", "budget": 2, "resolution": 16, "samples_per_ray": 8,
                                "eval_views": 4, "eval_resolution": 16, "device": "auto"})
    results = []
    run_local(cells(spec, tmp_path), settings, 0, results.append, gpus=["3", "5"])
    assert sorted((r["cell"], r["status"], r["cuda_visible_devices"]) for r in results) == [
        ("mvsds-k2/mug/s0", "skipped", "5"), ("sds/mug/s0", "skipped", "3")]


def test_bench_protocol_flag_reaches_the_aggregation(tmp_path, monkeypatch, capsys):
    from mvsdi.bench import cli as bench_cli
    from mvsdi.cli import main

    seen = {}

    def fake_aggregate(spec, out, protocol="ours"):
        seen["protocol"] = protocol
        (out / "reference").mkdir(parents=True, exist_ok=True)
        (out / "reference" / "summary.md").write_text("reference summary\n")
        return {"rows": []}

    monkeypatch.setattr(bench_cli, "aggregate", fake_aggregate)
    monkeypatch.setattr(bench_cli, "read_spec", lambda out: None)
    monkeypatch.setattr(bench_cli, "write_convergence", lambda out: None)
    assert main(["bench", "--aggregate-only", str(tmp_path), "--protocol", "reference"]) == 0
    assert seen["protocol"] == "reference" and "reference summary" in capsys.readouterr().out
