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


def test_execution_settings_are_the_knobs_declared_so():
    from mvsdi.config import execution_settings

    assert set(execution_settings()) == {"device", "checkpoint_every", "view_batching", "fast_unet"}


def test_every_config_field_is_a_knob_with_a_help_text():
    import dataclasses

    from mvsdi.knobs import knob_of

    from mvsdi.aggregation import AggregationConfig
    from mvsdi.cameras import CameraRanges
    from mvsdi.config import OptimConfig
    from mvsdi.field import FieldConfig
    from mvsdi.guidance import SDIConfig, SDSConfig
    from mvsdi.priors.prompts import PromptConfig
    from mvsdi.render import RenderConfig
    from mvsdi.schedules import LevelSchedule, LossWeights, Ramp, Schedules, ShadingSchedule

    for cls in (RunConfig, SDSConfig, SDIConfig, CameraRanges, FieldConfig, RenderConfig, Schedules, LevelSchedule,
                ShadingSchedule, LossWeights, Ramp, PromptConfig, AggregationConfig, OptimConfig):
        for f in dataclasses.fields(cls):  # knob_of refuses a field not declared with knob()
            assert knob_of(f).help.strip(), f"{cls.__name__}.{f.name}"


def test_the_label_is_the_presets_name_only_while_the_method_is_the_presets():
    import dataclasses

    from mvsdi.config import apply_settings, preset_of, run_label

    def label(config):
        return run_label(config, preset_of(config))

    k2 = preset("mvsdi-k2", "x")
    # the prompt, seed, budget, sizes and execution settings are not the method
    assert label(preset("mvsdi-k2", "y", seed=3, budget=8, resolution=16, device="cpu", model="tiny")) == "mvsdi-k2"
    assert label(preset("mvsdi-k6-octa", "x", budget=12)) == "mvsdi-k6-octa"
    four = dataclasses.replace(k2, views=4)
    assert four.preset == "mvsdi-k2" and label(four) == "sdi-k4-antipodal"  # the preset it started from stays
    assert label(apply_settings(k2, {"guidance.guidance_scale": "20"})) == "sdi-k2-antipodal"
    assert label(apply_settings(k2, {"aggregation.kind": "consensus"})) == "sdi-k2-antipodal-consensus"
    assert label(preset("cw-mvsdi-k2", "x")) == "cw-mvsdi-k2"
    assert label(apply_settings(preset("sds", "x"), {"views": "2", "sampler": "antipodal"})) == "sds-k2-antipodal"
    assert label(dataclasses.replace(k2, preset="my-own")) == "sdi-k2-antipodal"  # a name that is no preset


def test_a_bench_sets_only_knobs_outside_the_method():
    from mvsdi.bench.matrix import OVERRIDES
    from mvsdi.knobs import names

    assert set(OVERRIDES) <= set(names(RunConfig, method=False))
