"""Convergence curves: the points `generate` records (fixed front view, costs spent), resume without
duplicates, `mvsdi eval`'s convergence.json, and the bench's per-preset mean and 95% interval."""

import argparse
import json
import math
import os
import signal

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mvsdi import cli
from mvsdi.bench import convergence as bc
from mvsdi.cameras import evaluation_cameras
from mvsdi.distill import Distiller
from mvsdi.evaluate import cli as eval_cli
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate import convergence as ec
from mvsdi.evaluate.run_folder import load_images
from mvsdi.generate import CONVERGENCE_POINTS, Validation, forget_points_after, front_camera, read_points
from mvsdi.statistics import t_quantile_95

# K=2, budget 8: four steps, so a point after each (fewer than ten steps: every step ends a tenth)
TINY = ["--model", "tiny", "--preset", "mvsds-k2", "--budget", "8", "--resolution", "16", "--samples-per-ray", "8",
        "--eval-views", "2", "--eval-resolution", "16", "--checkpoint-every", "1", "--no-progress"]
PROMPT = "a wooden chair"


def _generate(out, *extra):
    return cli.main(["generate", PROMPT, *TINY, "--out", str(out), *extra])


def _lines(run):
    return (run / "validation" / CONVERGENCE_POINTS).read_text().splitlines()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence") / "run"
    assert _generate(out) == 0
    return out


# ---------------------------------------------------------------------------------------------
# generate: the points


def test_a_point_per_validation_with_the_costs_spent_so_far(run):
    points = read_points(run / "validation")
    log = {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    assert [p["step"] for p in points] == [1, 2, 3, 4]
    assert [p["fraction"] for p in points] == [0.25, 0.5, 0.75, 1.0]
    for p in points:
        step = log[p["step"] - 1]  # the log's step is 0-based; a point counts the steps done
        assert p["guidance_evaluations"] == step["guidance_evaluations"] == 2 * p["step"]
        # UNet forward passes are the images through the UNet (batch elements), the calls kept beside
        assert p["unet_forward_passes"] == p["unet_images"] == step["unet_images"]
        assert p["unet_calls"] == step["unet_calls"]
        assert (run / "validation" / p["image"]).is_file()
    assert points[-1]["guidance_evaluations"] == json.loads((run / "summary.json").read_text())["budget"]


def test_the_front_camera_is_fixed_and_is_the_evaluation_s_view_0(run):
    camera = front_camera()
    assert camera == {"azimuth_deg": 0.0, "elevation_deg": 15.0, "distance": 2.0, "fovy_deg": 70.0}
    for n in (2, 4, 50):  # view 0 of any number of evaluation views is the same camera
        cams = evaluation_cameras(n)
        assert (float(cams.azimuth_deg[0]), float(cams.elevation_deg[0])) == (0.0, 15.0)
    assert all(p["camera"] == camera for p in read_points(run / "validation"))
    # the last point is the final field seen from that camera: the evaluation's front render, pixel for pixel
    last = read_points(run / "validation")[-1]
    assert last["resolution"] == 16
    assert np.array_equal(iio.imread(run / "validation" / last["image"]), iio.imread(run / "renders" / "000.png"))


@pytest.mark.parametrize("steps, expected", [(4, [1, 2, 3, 4]), (20, list(range(2, 21, 2))),
                                             (1666, [167, 334, 500, 667, 833, 1000, 1167, 1333, 1500, 1666])])
def test_points_fall_at_each_tenth_and_the_last_at_the_end(steps, expected):
    validation = Validation.__new__(Validation)  # only the schedule: no distiller needed
    validation.steps = steps
    assert [s + 1 for s in range(steps) if validation.due(s)] == expected


def _interrupt_after(monkeypatch, steps):
    original = Distiller.step

    def step(self):
        record = original(self)
        if self.counters.steps == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Distiller, "step", step)


def test_resume_does_not_duplicate_points(run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    assert _generate(out) == 130
    assert len(_lines(out)) == 2
    monkeypatch.undo()
    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert _lines(out) == _lines(run)  # same points, once each, in order
    assert sorted(p.name for p in (out / "validation").glob("*_front.png")) == \
        sorted(p.name for p in (run / "validation").glob("*_front.png"))


def test_a_resume_forgets_the_points_made_after_its_checkpoint(run, tmp_path):
    """A kill after the checkpoint at 4 evaluations left points at 6 and 8 and a line cut short."""
    folder = tmp_path / "validation"
    folder.mkdir()
    for name in ("2_front.png", "4_front.png", "6_front.png", "8_front.png"):
        (folder / name).write_bytes((run / "validation" / name).read_bytes())
    lines = _lines(run)
    (folder / CONVERGENCE_POINTS).write_text("\n".join(lines) + '\n{"step": 5, "fra')
    forget_points_after(folder, 4)
    assert (folder / CONVERGENCE_POINTS).read_text().splitlines() == lines[:2]
    assert sorted(p.name for p in folder.glob("*_front.png")) == ["2_front.png", "4_front.png"]


# ---------------------------------------------------------------------------------------------
# eval: convergence.json


def _eval(argv, capsys):
    parser = argparse.ArgumentParser(prog="mvsdi")
    eval_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    code = eval_cli.run(parser.parse_args(["eval", *argv]))
    return code, capsys.readouterr().err


def test_eval_writes_one_clip_score_per_point(run, tmp_path, tiny_clip, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, err = _eval([str(copy), "--clip-b32", str(tiny_clip), "--clip-b16", str(tiny_clip), "--device", "cpu"],
                      capsys)
    assert code == 0, err
    result = json.loads((copy / ec.CONVERGENCE_FILE).read_text())
    points = read_points(copy / "validation")
    assert len(result["points"]) == len(points) == 4
    for key in ("step", "fraction", "guidance_evaluations", "unet_forward_passes", "unet_calls", "image"):
        assert [p[key] for p in result["points"]] == [p[key] for p in points]
    scorer = cm.ClipScorer.load(str(tiny_clip), "test", "--clip-b32")
    images = torch.stack(load_images([copy / "validation" / p["image"] for p in points]))
    direct = cm.clip_score(scorer.embed_images(images), scorer.embed_texts([PROMPT])[0])
    # float32 CLIP embeddings, stored rounded to 6 decimals
    assert np.allclose([p["clip_score"] for p in result["points"]], direct.double().numpy(), rtol=0, atol=2e-6)
    assert result["model"] == str(tiny_clip) and result["camera"] == front_camera()
    assert (copy / ec.CONVERGENCE_PLOT).stat().st_size > 0


def test_eval_without_the_clip_score_or_without_points_writes_no_curve(run, tmp_path, tiny_clip, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert _eval([str(copy), "--metrics", "divergence", "--clip-b32", str(tiny_clip)], capsys)[0] == 0
    assert not (copy / ec.CONVERGENCE_FILE).exists()
    (copy / "validation" / CONVERGENCE_POINTS).unlink()  # a run from before the points existed
    assert _eval([str(copy), "--metrics", "clip_score", "--clip-b32", str(tiny_clip)], capsys)[0] == 0
    assert not (copy / ec.CONVERGENCE_FILE).exists()


@pytest.mark.parametrize("damage, message", [("{not json", "line 2 is not JSON"),
                                             ('{"step": 2}', "line 2 lacks fraction"),
                                             ("missing image", "names 4_front.png, which is not in")])
def test_a_damaged_points_file_is_a_clear_error_exit_2(run, tmp_path, tiny_clip, capsys, damage, message):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lines = _lines(copy)
    if damage == "missing image":
        (copy / "validation" / "4_front.png").unlink()
    else:
        lines[1] = damage
    (copy / "validation" / CONVERGENCE_POINTS).write_text("\n".join(lines) + "\n")
    code, err = _eval([str(copy), "--metrics", "clip_score", "--clip-b32", str(tiny_clip)], capsys)
    assert code == 2 and err.startswith("mvsdi eval: error: ") and message in err


# ---------------------------------------------------------------------------------------------
# bench: per-preset mean and 95% interval


def _fake_run(root, name, scores, passes):
    """A cell's convergence.json with points at 0.5 and 1.0 of a budget of 4."""
    path = root / name
    path.mkdir(parents=True)
    points = [{"step": k, "fraction": k / 2, "guidance_evaluations": 2 * k, "unet_forward_passes": u, "unet_calls": 1,
               "image": f"{2 * k}_front.png", "clip_score": s} for k, (s, u) in enumerate(zip(scores, passes), 1)]
    (path / ec.CONVERGENCE_FILE).write_text(json.dumps({"points": points}))
    return name


def test_bench_mean_and_interval_over_two_runs(tmp_path):
    rows = [{"preset": "a", "status": "ok", "path": _fake_run(tmp_path, "a/p/s0", [0.1, 0.3], [4, 8])},
            {"preset": "a", "status": "ok", "path": _fake_run(tmp_path, "a/p/s1", [0.2, 0.6], [6, 10])},
            {"preset": "a", "status": "diverged", "path": _fake_run(tmp_path, "a/p/s2", [9.0, 9.0], [0, 0])},
            {"preset": "b", "status": "ok", "path": _fake_run(tmp_path, "b/p/s0", [0.5, 0.7], [2, 4])},
            {"preset": "b", "status": "ok", "path": "b/p/s1"}]  # no convergence.json (e.g. the testbed): no curve
    table = bc.curves(rows, ["a", "b"], tmp_path)
    assert [(e["preset"], e["fraction"], e["cells"]) for e in table] == [("a", 0.5, 2), ("a", 1.0, 2),
                                                                        ("b", 0.5, 1), ("b", 1.0, 1)]
    t = t_quantile_95(1)
    for entry, (x, y), passes in zip(table[:2], [(0.1, 0.2), (0.3, 0.6)], [5.0, 9.0]):
        mean, half = entry["clip_score"]
        sd = abs(x - y) / math.sqrt(2)  # the sample standard deviation of two values
        assert mean == pytest.approx((x + y) / 2, rel=0, abs=1e-15)
        assert half == pytest.approx(t * sd / math.sqrt(2), rel=1e-12)
        assert entry["unet_forward_passes"] == passes and entry["guidance_evaluations"] == 2 * entry["fraction"] * 2
    assert table[2]["clip_score"][0] == 0.5 and math.isnan(table[2]["clip_score"][1])  # one run: no interval
    csv_text = bc.curves_csv(table)
    assert csv_text.splitlines()[0] == ",".join(bc.COLUMNS) and csv_text.count("\n") == 5
    from mvsdi.bench.plots import plot_convergence

    assert plot_convergence(table, ["a", "b"], tmp_path / "plots" / "convergence.png").stat().st_size > 0


def test_a_rollback_s_repeated_point_counts_once_the_redone_one(tmp_path):
    name = _fake_run(tmp_path, "a/p/s0", [0.1, 0.3], [4, 8])
    path = tmp_path / name / ec.CONVERGENCE_FILE
    data = json.loads(path.read_text())
    data["points"].insert(1, {**data["points"][0], "guidance_evaluations": 6, "clip_score": 0.2})
    path.write_text(json.dumps(data))
    points = bc.run_points(tmp_path / name)
    assert [(p["fraction"], p["clip_score"]) for p in points] == [(0.5, 0.2), (1.0, 0.3)]
    del data["points"][0]["clip_score"]  # a damaged file: the cell adds no points rather than stopping the bench
    path.write_text(json.dumps(data))
    assert bc.run_points(tmp_path / name) == []


def test_bench_end_to_end_writes_the_curves(tiny_clip, tmp_path, monkeypatch):
    """One Stable Diffusion preset (tiny random stack) × one prompt × two seeds, CLIP on a tiny random model."""
    from mvsdi.evaluate import runs
    from mvsdi.evaluate.divergence import Divergence

    # two steps of a random stack render flat views, which the divergence rule rejects; the curves
    # are averaged over cells that did not diverge, so call these two fine
    monkeypatch.setattr(runs, "check_divergence", lambda images: Divergence(False, None, len(images), 0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    out = tmp_path / "out"
    argv = ["bench", "--presets", "sds", "--prompts", str(prompts), "--seeds", "0,1", "--model", "tiny",
            "--budget", "2", "--resolution", "16", "--samples-per-ray", "8", "--eval-views", "2",
            "--eval-resolution", "16", "--device", "cpu", "--metrics", "clip_score", "--clip-b32", str(tiny_clip),
            "--out", str(out)]
    assert cli.main(argv) == 0
    runs = [json.loads((out / "sds" / "a-red-apple" / f"s{s}" / ec.CONVERGENCE_FILE).read_text())["points"]
            for s in (0, 1)]
    lines = (out / bc.CURVES_CSV).read_text().splitlines()
    assert lines[0] == ",".join(bc.COLUMNS) and len(lines) == 1 + len(runs[0]) == 3  # K=1, budget 2: two points
    first = dict(zip(bc.COLUMNS, lines[1].split(",")))
    assert first["preset"] == "sds" and first["cells"] == "2" and float(first["guidance_evaluations"]) == 1
    expected = (runs[0][0]["clip_score"] + runs[1][0]["clip_score"]) / 2
    assert float(first["clip_score_mean"]) == pytest.approx(expected, rel=0, abs=1e-6)  # written with 6 digits
    assert (out / bc.CURVES_PLOT).stat().st_size > 0
