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


# ------------------------------------------------------------------------------------------------
# the options are the config's knobs (issue 13)


def generate_parser():
    import argparse

    from mvsdi.cli import _add_generate

    parser = argparse.ArgumentParser(prog="mvsdi")
    _add_generate(parser.add_subparsers(dest="command"))
    return parser


def configured(*argv):
    from mvsdi.cli import configure

    return configure(generate_parser().parse_args(["generate", *argv]))


def dotted_paths(data: dict, prefix: str = ""):
    """Every leaf of a config.json, walked from the JSON (not from the code that makes the options)."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from dotted_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_field_of_config_json_has_an_option_with_a_help_text(capsys):
    from mvsdi.config import preset

    parser = generate_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    options = {flag: action for action in sub._actions for flag in action.option_strings}
    paths = {path for name in ("sds", "sdi") for path in dotted_paths(preset(name, "x").to_dict())}
    assert "guidance.delta_max" in paths and "guidance.t_min" in paths and "schedules.weights.tv.f1" in paths
    for path in paths - {"prompt", "preset"}:  # the positional PROMPT and --preset (the start) stand for those
        assert f"--{path}" in options, path
        assert options[f"--{path}"].help.strip(), path
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"--{path}" in text for path in paths - {"prompt", "preset"})
    assert "--guidance.delta_max INT t' = min(t + δ, T−1), δ ~ U{0..delta_max} (SDI only)" in text


def test_a_dotted_option_and_set_give_the_same_config():
    from mvsdi.config import preset

    dotted = configured("x", "--guidance.delta_max", "20", "--cameras.fovy_deg", "40", "60", "--optim.lr", "0.005",
                        "--field.compiled", "--prompts.perp_neg", "false", "--prompts.view_dependent", "no",
                        "--aggregation.fixed_sharpness", "2", "--views", "4")
    sets = configured("x", "--set", "guidance.delta_max=20", "--set", "cameras.fovy_deg=40,60", "--set",
                      "optim.lr=0.005", "--set", "field.compiled=true", "--set", "prompts.perp_neg=false", "--set",
                      "prompts.view_dependent=false", "--set", "aggregation.fixed_sharpness=2", "--set", "views=4")
    assert dotted == sets and dotted != preset("mvsdi-k2", "x")
    assert (dotted.guidance.delta_max, dotted.cameras.fovy_deg, dotted.field.compiled) == (20, (40.0, 60.0), True)


def test_the_short_flags_keep_their_meaning():
    from mvsdi.schedules import Ramp

    config = configured("x", "-k", "4", "--sampler", "mixed", "--budget", "8", "--model", "tiny", "--seed", "3",
                        "--resolution", "16", "--samples-per-ray", "8", "--eval-views", "2", "--eval-resolution", "12",
                        "--device", "cpu", "--checkpoint-every", "5", "--view-batching", "sequential",
                        "--fast-unet", "compile", "--aggregation", "consensus", "--elevation-range", "-5", "30",
                        "--guidance-scale", "5", "--inversion-guidance-scale", "-5", "--no-t-anneal",
                        "--negative-prompt", "blurry", "--tv-weight", "0.01", "--tv-warmup", "0.1",
                        "--schedule", "reference")
    assert (config.views, config.sampler, config.budget, config.model, config.seed) == (4, "mixed", 8, "tiny", 3)
    assert (config.resolution, config.samples_per_ray, config.eval_views, config.eval_resolution) == (16, 8, 2, 12)
    assert (config.device, config.checkpoint_every, config.view_batching, config.fast_unet) == (
        "cpu", 5, "sequential", "compile")
    assert config.aggregation.kind == "consensus" and config.cameras.elevation_deg == (-5.0, 30.0)
    assert (config.guidance.guidance_scale, config.guidance.inversion_guidance_scale) == (5.0, -5.0)
    assert config.guidance.t_anneal is False and config.prompts.negative_prompt == "blurry"
    assert config.schedules.weights.tv == Ramp(0.0, 0.01, 0.0, 0.1)
    assert config.schedule == "reference" and config.guidance.t_anneal_span == 4.0  # derived for the final K


@pytest.mark.parametrize("args,message", [
    (["--views", "two"], "views takes an int, got 'two'"),
    (["--aggregation", "median"], "aggregation.kind must be one of mean, consensus, got 'median'"),
    (["--guidance.t_anneal", "maybe"], "guidance.t_anneal is true or false"),
    (["--preset", "sds", "--inversion-guidance-scale", "3"], "guidance.inversion_guidance_scale is a setting of SDI"),
    (["--set", "guidance.guidance_scal=3"], "unknown setting 'guidance.guidance_scal'"),
])
def test_an_ill_typed_or_unknown_knob_exits_2_naming_it(args, message, tmp_path, capsys):
    assert main(["generate", "a cat", *args, "--out", str(tmp_path / "o"), *FAST]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_option_that_is_no_knob_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "a cat", "--guidance.colour", "3"])
    assert info.value.code == 2 and "--guidance.colour" in capsys.readouterr().err


def test_the_default_folder_names_the_preset_only_while_the_method_is_the_presets():
    from mvsdi.cli import _target

    def target(*argv):
        return _target(generate_parser().parse_args(["generate", "a cat", *argv, "--device", "cpu"]))

    config, out = target("--preset", "mvsdi-k2", "--views", "4")
    assert config.preset == "mvsdi-k2" and config.views == 4  # the preset it started from, in config.json
    assert out == Path("runs/a-cat-sdi-k4-antipodal-s0")
    assert target("--preset", "mvsdi-k2", "--budget", "8", "--seed", "2")[1] == Path("runs/a-cat-mvsdi-k2-s2")
    assert target("--preset", "sds", "--model", "ideal:16")[1] == Path("runs/a-cat-sds-s0")  # testbed cameras too


def test_resume_takes_the_execution_settings_parsed():
    from mvsdi.cli import _overrides

    args = generate_parser().parse_args(["generate", "--resume", "RUN", "--device", "cpu", "--checkpoint-every", "5"])
    assert _overrides(args) == {"device": "cpu", "checkpoint_every": 5}
