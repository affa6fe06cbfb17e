"""`mvsdi generate` end to end with the tiny stack, and every bad input of the pipeline issue."""

import json
from pathlib import Path

import imageio.v2
import imageio.v3 as iio
import pytest

from mvsdi.cli import main

FAST = ["--model", "tiny", "--resolution", "16", "--samples-per-ray", "16", "--eval-resolution", "16",
        "--device", "cpu", "--no-progress"]


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "strawberry"
    args = ["generate", "a ripe strawberry", "--preset", "mvsdi-k2", "--budget", "8", "--out", str(out), *FAST]
    assert main(args) == 0
    return out


def test_generate_writes_a_complete_run_directory(finished_run):
    files = {p.name for p in finished_run.iterdir()}
    assert {"config.json", "checkpoint.pt", "log.jsonl", "summary.json", "turntable.mp4", "renders"} <= files
    config = json.loads((finished_run / "config.json").read_text())
    assert config["views"] == 2 and config["sampler"] == "antipodal" and config["budget"] == 8
    records = [json.loads(line) for line in (finished_run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4  # budget 8 / K=2
    for key in ("loss", "t", "guidance_evaluations", "unet_calls", "lr"):
        assert all(key in r for r in records)
    assert [r["guidance_evaluations"] for r in records] == [2, 4, 6, 8]
    renders = sorted((finished_run / "renders").glob("[0-9][0-9][0-9].png"))
    assert len(renders) == 50
    assert iio.imread(renders[0]).shape == (16, 16, 3)
    frames = imageio.v2.mimread(finished_run / "turntable.mp4", format="ffmpeg")
    assert len(frames) == 50 and frames[0].shape == (16, 48, 3)  # RGB | normals | depth
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["guidance_evaluations"] == 8
    assert summary["unet_calls"] >= 8 and summary["steps"] == 4
    # validation renders beside the TensorBoard copy: every step here (4 steps < 10 validations),
    # min(4, eval views) views each, RGB | normals at min(64, eval resolution)
    validation = sorted(p.name for p in (finished_run / "validation").iterdir())
    views = [f"{spent}_view{i}.png" for spent in (2, 4, 6, 8) for i in range(4)]
    fronts = [f"{spent}_front.png" for spent in (2, 4, 6, 8)]  # the convergence curve's points
    assert validation == sorted([*views, *fronts, "convergence.jsonl"])
    assert iio.imread(finished_run / "validation" / "8_view0.png").shape == (16, 32, 3)
    assert not any(p.name.startswith(".") for p in finished_run.parent.iterdir())  # no staging left behind


def test_existing_run_is_refused_and_left_untouched(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    code, text = run(["generate", "a ripe strawberry", "--budget", "2", "--out", str(finished_run), *FAST], capsys)
    assert code == 2 and "already holds" in text and "--overwrite" in text
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before


def test_overwrite_replaces_the_run_only_when_the_new_one_completes(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["generate", "a red apple", "--preset", "sds", "--budget", "2", "--eval-views", "2", "--out", str(out)]
    assert main([*args, *FAST]) == 0
    # a failing replacement (model cannot load) leaves the old run as it was
    code, _ = run(["generate", "a red apple", "--preset", "sds", "--budget", "2", "--model", str(tmp_path / "nope"),
                   "--overwrite", "--out", str(out), *FAST[2:]], capsys)
    assert code == 2 and json.loads((out / "config.json").read_text())["budget"] == 2
    assert main(["generate", "a red apple", "--preset", "sds", "--budget", "4", "--eval-views", "2",
                 "--overwrite", "--out", str(out), *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["budget"] == 4


@pytest.mark.parametrize("args,message", [
    (["generate", "", "--budget", "4"], "prompt is empty"),
    (["generate", "   ", "--budget", "4"], "prompt is empty"),
    (["generate", "a cat", "--views", "0", "--sampler", "random"], ">= 1"),
    (["generate", "a cat", "--views", "3", "--sampler", "mixed"], "cannot make K=3"),
    (["generate", "a cat", "--views", "2", "--sampler", "octahedral"], "K = 6"),
    (["generate", "a cat", "--views", "4", "--budget", "2"], "smaller than K=4"),
    (["generate", "a cat", "--views", "4", "--budget", "10"], "not a multiple of K=4: use 8 or 12"),
    (["generate", "a cat", "--preset", "dreamfusion"], "unknown preset 'dreamfusion'"),
    (["generate", "a cat", "--resolution", "0"], "resolution must be >= 8"),
    (["generate", "a cat", "--resolution", "7"], "resolution must be >= 8"),
    (["generate", "a cat", "--eval-resolution", "1"], "eval_resolution must be >= 8"),
    (["generate", "a cat", "--device", "tpu"], "unknown device 'tpu'"),
    (["generate", "a cat", "--device", "cuda:x"], "unknown device 'cuda:x'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    # the case's own options come last so they win over FAST's
    code, text = run([*args[:2], *FAST, *args[2:], "--out", str(out)], capsys)
    assert code == 2 and message in text
    assert not out.exists() and not any(tmp_path.iterdir())


def test_model_that_cannot_load_says_how_to_point_elsewhere(tmp_path, capsys):
    out = tmp_path / "never"
    code, text = run(["generate", "a cat", "--budget", "2", "--model", "no-such-org/no-such-model",
                      "--out", str(out), *FAST[2:]], capsys)
    assert code == 2 and "no-such-org/no-such-model" in text and "local folder" in text
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_unwritable_output_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = run(["generate", "a cat", "--budget", "2", "--out", str(blocker / "run"), *FAST], capsys)
    assert code == 2 and "cannot write" in text
    code, text = run(["generate", "a cat", "--budget", "2", "--out", str(blocker), *FAST], capsys)
    assert code == 2 and "not a directory" in text
    assert Path(blocker).read_text() == "x"


def test_eval_is_wired_into_the_main_command(finished_run, capsys):
    code, text = run(["eval", str(finished_run), "--metrics", "divergence"], capsys)
    assert code == 0 and "a ripe strawberry" in text
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert "diverged" in json.dumps(metrics)
    code, text = run(["eval", str(finished_run), "--metrics", "clip_scroe"], capsys)
    assert code == 2 and "clip_score" in text


def test_an_ideal_prior_run_trains_on_the_references_cameras():
    """`generate --model ideal` draws its views like the testbed's references (no jitter, fovy 55°),
    unless the run chose its cameras."""
    import dataclasses

    from mvsdi.cameras import CameraRanges
    from mvsdi.cli import _ideal_prior_cameras
    from mvsdi.config import preset
    from mvsdi.testbed.prior import TESTBED_CAMERAS

    assert _ideal_prior_cameras(preset("sds", "duck", model="ideal:32")).cameras == TESTBED_CAMERAS
    assert _ideal_prior_cameras(preset("sds", "duck", model="tiny")).cameras == CameraRanges()
    chosen = dataclasses.replace(CameraRanges(), elevation_deg=(0.0, 10.0))
    assert _ideal_prior_cameras(preset("sds", "duck", model="ideal:32", cameras=chosen)).cameras == chosen
