"""Dotted settings (--set), the method flags of `mvsdi generate`, and the TV regulariser."""

import json

import pytest
import torch

from mvsdi.cli import main
from mvsdi.config import RunConfig, preset
from mvsdi.overrides import apply, apply_all, parse_assignment
from mvsdi.regularisers import total_variation
from mvsdi.schedules import Ramp, reference_schedules


def test_dotted_settings_are_parsed_by_the_fields_type():
    config = apply_all(preset("mvsdi-k2", "x"), {
        "guidance.guidance_scale": "50", "cameras.elevation_deg": "-20,60", "guidance.t_anneal": "false",
        "optim.lr": "0.005", "aggregation.kind": "consensus", "aggregation.fixed_sharpness": "2",
        "schedules.weights.tv.end": "0.01", "prompts.negative_prompt": "blurry, low quality", "seed": "4"})
    assert config.guidance.guidance_scale == 50.0 and config.cameras.elevation_deg == (-20.0, 60.0)
    assert config.guidance.t_anneal is False and config.optim.lr == 0.005 and config.seed == 4
    assert config.aggregation.kind == "consensus" and config.aggregation.fixed_sharpness == 2.0
    assert config.schedules.weights.tv == Ramp(0.0, 0.01) and config.prompts.negative_prompt == "blurry, low quality"
    assert apply(config, "aggregation.fixed_sharpness", "none").aggregation.fixed_sharpness is None


@pytest.mark.parametrize("path,value,message", [
    ("guidance.guidance_scal", "5", "SDIConfig has guidance_scale"),
    ("guidance.guidance_scale", "high", "takes a float"),
    ("aggregation.kind", "median", "one of mean, consensus"),
    ("cameras.elevation_deg", "10", "takes 2 comma-separated values"),
    ("guidance.t_anneal", "maybe", "true or false"),
    ("optim", "3", "set its fields one by one"),
    ("seed.x", "3", "a value, not a group"),
    ("views", "3", "not a multiple of K=3"),  # the config's own validation still runs
])
def test_bad_settings_say_what_exists(path, value, message):
    with pytest.raises(ValueError, match=message):
        apply(preset("mvsdi-k2", "x"), path, value)


def test_an_assignment_needs_an_equals_sign():
    assert parse_assignment("a.b = 3") == ("a.b", "3")
    with pytest.raises(ValueError, match="PATH=VALUE"):
        parse_assignment("guidance.guidance_scale")


FAST = ["--model", "tiny", "--resolution", "16", "--samples-per-ray", "8", "--eval-views", "2",
        "--eval-resolution", "16", "--device", "cpu", "--no-progress", "--no-tensorboard"]


def test_method_flags_reach_the_runs_config_and_a_consensus_run_logs_its_weights(tmp_path):
    out = tmp_path / "run"
    args = ["generate", "a chair", "--preset", "mvsdi-k4", "--budget", "8", "--out", str(out),
            "--schedule", "reference", "--aggregation", "consensus", "--elevation-range", "-5", "30",
            "--guidance-scale", "5", "--inversion-guidance-scale", "-5", "--negative-prompt", "blurry",
            "--tv-weight", "0.01", "--tv-warmup", "0.1", "--set", "guidance.delta_max=20", *FAST]
    assert main(args) == 0
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.schedule == "reference" and config.schedules == reference_schedules(4, config.schedules)
    assert config.guidance.t_anneal_span == 4.0 and config.guidance.delta_max == 20
    assert (config.guidance.guidance_scale, config.guidance.inversion_guidance_scale) == (5.0, -5.0)
    assert config.cameras.elevation_deg == (-5.0, 30.0) and config.prompts.negative_prompt == "blurry"
    assert config.schedules.weights.tv == Ramp(0.0, 0.01, 0.0, 0.1) and config.aggregation.kind == "consensus"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(len(r["consensus_weights"]) == 4 for r in records) and "loss_tv" in records[-1]


def test_resume_refuses_method_changes(tmp_path, capsys):
    assert main(["generate", "--resume", str(tmp_path), "--guidance-scale", "5", *FAST]) == 2
    assert "method comes from the run" in capsys.readouterr().err


def test_total_variation_is_the_mean_absolute_neighbour_difference(float64):
    rgb = torch.zeros(1, 4, 4, 3)
    rgb[:, :, 2:] = 1.0  # one vertical edge: horizontal differences 1 on one column of three
    assert total_variation(rgb).tolist() == pytest.approx([1 / 3])
    assert total_variation(torch.rand(2, 5, 5, 3)).shape == (2,)


def test_a_runs_config_json_passed_back_with_config_repeats_the_run(tmp_path):
    first, again, varied = tmp_path / "first", tmp_path / "again", tmp_path / "varied"
    assert main(["generate", "a chair", "--preset", "sds", "--budget", "3", "--guidance-scale", "20",
                 "--out", str(first), *FAST]) == 0
    assert main(["generate", "--config", str(first / "config.json"), "--out", str(again), *FAST]) == 0
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (first, again)]
    assert losses[0] == losses[1]  # the same machine and software: bit for bit
    assert main(["generate", "--config", str(first / "config.json"), "--seed", "1", "--set", "optim.lr=0.02",
                 "--out", str(varied), *FAST]) == 0
    config = json.loads((varied / "config.json").read_text())
    assert (config["seed"], config["optim"]["lr"], config["guidance"]["guidance_scale"]) == (1, 0.02, 20.0)


def test_a_config_file_that_is_not_one_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"prompt": "a"}')
    assert main(["generate", "--config", str(bad), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "not a mvsdi run config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_settings_apply_together_so_a_valid_combination_is_never_half_applied():
    sdi = preset("sdi", "x")
    with pytest.raises(ValueError, match="not a multiple of K=3"):
        apply(sdi, "views", "3")  # alone, K=3 does not divide the budget of 10,000
    assert (apply_all(sdi, {"views": "3", "budget": "9"}).steps) == 3
    both = apply_all(sdi, {"guidance.t_start": "0.2", "guidance.t_end": "0.1"})  # t_end <= t_start only together
    assert (both.guidance.t_start, both.guidance.t_end) == (0.2, 0.1)


def test_a_setting_of_the_other_guidance_kind_says_whose_it_is():
    with pytest.raises(ValueError, match="guidance.delta_max is a setting of SDIConfig only.*guidance is SDSConfig"):
        apply(preset("sds", "x"), "guidance.delta_max", "5")
    with pytest.raises(ValueError, match="guidance.t_min is a setting of SDSConfig only"):
        apply(preset("sdi", "x"), "guidance.t_min", "0.1")


def test_top_level_fields_parse_by_their_declared_type():
    from mvsdi.overrides import parse_fields

    assert parse_fields(RunConfig, {"views": "4", "device": "cpu", "perturb_samples": "no"}) == {
        "views": 4, "device": "cpu", "perturb_samples": False}
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        parse_fields(RunConfig, {"colour": "red"})
