import json

import pytest

from mvsdi.config import PRESETS, RunConfig, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_survives_a_json_round_trip(name):
    config = preset(name, "a ripe strawberry", seed=3)
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_presets_say_what_the_paper_compares():
    assert preset("sdi", "x").views == 1 and preset("sdi", "x").guidance.kind == "sdi"
    k2, k4 = preset("mvsdi-k2", "x"), preset("mvsdi-k4", "x")
    assert (k2.views, k2.sampler, k2.steps) == (2, "antipodal", 5000)
    assert (k4.views, k4.sampler, k4.steps) == (4, "antipodal", 2500)
    assert k2.prompts.perp_neg and not preset("sds", "x").prompts.perp_neg
    assert preset("sds", "x").guidance.guidance_scale == 100 and k2.guidance.guidance_scale == 7.5


def test_unknown_guidance_kind_in_a_config_file_is_refused():
    data = preset("sdi", "x").to_dict()
    data["guidance"]["kind"] = "vsd"
    with pytest.raises(ValueError, match="unknown guidance kind"):
        RunConfig.from_dict(data)


@pytest.mark.parametrize("field", ["resolution", "eval_resolution"])
def test_renders_smaller_than_8_pixels_are_refused_with_the_smallest_valid_size(field):
    for bad in (0, 1, 7):
        with pytest.raises(ValueError, match=rf"{field} must be >= 8 pixels a side, got {bad}: .*convexity"):
            preset("sdi", "x", **{field: bad})
    for good in (8, 12, 33):  # not only multiples of 8: the prior resizes every render to its own input
        assert getattr(preset("sdi", "x", **{field: good}), field) == good


def test_the_papers_table_is_a_set_of_presets():
    rows = {"sdi": (1, "random", "mean"), "mvsdi-k2-uniform": (2, "stratified", "mean"),
            "mvsdi-k2": (2, "antipodal", "mean"), "mvsdi-k4": (4, "antipodal", "mean"),
            "mvsdi-k4-mixed": (4, "mixed", "mean"), "mvsdi-k6-octa": (6, "octahedral", "mean"),
            "cw-mvsdi-k2": (2, "antipodal", "consensus")}
    for name, row in rows.items():
        config = preset(name, "x")
        assert (config.views, config.sampler, config.aggregation.kind) == row
        assert config.guidance.kind == "sdi" and config.prompts.perp_neg
    assert preset("mvsdi-k6-octa", "x").cameras.elevation_deg == (-30.0, 60.0)
    assert preset("mvsdi-k6-octa", "x").steps == 1666


def test_generate_help_says_what_each_preset_is(capsys):
    from mvsdi.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for name, (description, _) in PRESETS.items():
        assert f"{name} {description}" in lines
