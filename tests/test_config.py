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
