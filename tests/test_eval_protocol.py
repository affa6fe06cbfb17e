"""`mvsdi eval --protocol reference`: the MV-SDI reference's views and rules beside ours.

The view selection, the Janus pair, the R-Precision tie rule and the divergence rule against the
reference's scripts/evaluate.py (recomputed here with numpy as that script does), and the CLI end to
end on a tiny generated run whose reference views are rendered from its checkpoint."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from test_evaluate import eval_cli  # the same `mvsdi eval` driver as the default protocol's tests

import mvsdi
from mvsdi.cli import main
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate import run_folder, runs
from mvsdi.evaluate.protocol import (OURS, REFERENCE, get_protocol, janus_positions, protocol_candidates,
                                     reference_turntable_azimuths, reference_view_indices)
from mvsdi.evaluate.reference_renders import MANIFEST, reference_cameras

# scripts/evaluate.py: np.linspace(0, 120 - 1, 50, dtype=int) over the 120 test renders, as numpy
# computes it: positions 21 and 42 fall a rounding error below 51 and 102 and truncate to 50 and 101
REFERENCE_INDICES = [0, 2, 4, 7, 9, 12, 14, 17, 19, 21, 24, 26, 29, 31, 34, 36, 38, 41, 43, 46, 48, 50, 53, 55, 58,
                     60, 63, 65, 68, 70, 72, 75, 77, 80, 82, 85, 87, 89, 92, 94, 97, 99, 101, 104, 106, 109, 111, 114,
                     116, 119]
PROMPT = "a wooden chair"
PROMPTS = [PROMPT, "a blue teapot", "a red apple"]


def write_png(path, image):
    iio.imwrite(path, (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))


def fake_reference_run(root, name, images, prompt=PROMPT):
    """A run directory holding only the reference views (no checkpoint): images[k] is scored view k."""
    run = root / name
    (run / "renders_reference").mkdir(parents=True)
    (run / "renders").mkdir()
    (run / "config.json").write_text(json.dumps({"prompt": prompt, "eval_views": 4}))
    (run / "summary.json").write_text(json.dumps({"versions": {"mvsdi": mvsdi.__version__}}))
    for index, image in zip(REFERENCE_INDICES, images):
        write_png(run / "renders_reference" / f"{index:03d}.png", image)
    return run


# ---------------------------------------------------------------------------------------------
# the protocol's definitions


def test_the_50_scored_views_are_the_reference_s():
    assert reference_view_indices() == REFERENCE_INDICES
    azimuths = reference_turntable_azimuths()
    assert azimuths.shape == (120,) and azimuths[0] == 0.0 and azimuths[-1] == 360.0  # 0° twice: both ends
    # threestudio's torch.linspace in float32; the step is 360/119, not 3°
    assert torch.allclose(azimuths.double(), torch.arange(120, dtype=torch.float64) * 360 / 119, rtol=0, atol=1e-4)
    assert reference_view_indices(30, 50) == list(range(30))  # fewer renders than 50: all of them


def test_reference_cameras_share_our_geometry_but_not_our_azimuths():
    from mvsdi.cameras import evaluation_cameras

    ours, ref = evaluation_cameras(50), reference_cameras(REFERENCE_INDICES)
    for name in ("elevation_deg", "distance", "fovy_deg"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))  # 15°, 2, 70° in both
    assert torch.equal(ref.light_position, ref.position)  # the light at the camera, no jitter
    assert torch.allclose(ref.camera_to_world()[0], ours.camera_to_world()[0], rtol=0, atol=1e-6)  # front: the same
    assert ref.azimuth_deg[25].item() == pytest.approx(60 * 360 / 119 - 360, abs=1e-4)  # the back: 181.5°, not 180°
    assert ours.azimuth_deg[25].item() == pytest.approx(-180.0)
    assert torch.allclose(ref.position[-1], ref.position[0], rtol=0, atol=1e-5)  # view 119 (360°) is view 0 again


def test_the_janus_pair_is_the_first_and_the_middle_scored_view():
    assert janus_positions(50) == (0, 25) and janus_positions(7) == (0, 3) and janus_positions(1) is None
    front, back = janus_positions(len(REFERENCE_INDICES))
    assert (REFERENCE_INDICES[front], REFERENCE_INDICES[back]) == (0, 60)


def test_r_precision_ties_under_each_protocol():
    sim = torch.tensor([[0.5, 0.5, 0.1],   # the right text (col 1) ties an earlier one
                        [0.2, 0.6, 0.6],   # ties a later one
                        [0.1, 0.7, 0.3]])  # wins outright
    assert cm.r_precision(sim, 1, ties="miss").tolist() == [0.0, 0.0, 1.0]
    assert cm.r_precision(sim, 1, ties="first").tolist() == [0.0, 1.0, 1.0]  # argmax: the first maximum wins
    assert torch.equal(cm.r_precision(sim, 1, ties="first"), (sim.argmax(dim=1) == 1).float())
    assert cm.r_precision(sim[:, 1:2], 0, ties="first").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'miss' or 'first'"):
        cm.r_precision(sim, 1, ties="last")
    assert (OURS.r_precision_ties, REFERENCE.r_precision_ties) == ("miss", "first")


def test_candidates_and_unknown_protocols():
    assert protocol_candidates(OURS, ["a frog"], PROMPTS) == ["a frog", *PROMPTS]
    assert protocol_candidates(REFERENCE, ["A  Wooden chair"], PROMPTS) == PROMPTS  # exactly the list
    with pytest.raises(ValueError, match=r"(?s)lacks the prompt\(s\) \['a frog'\].*--prompts FILE"):
        protocol_candidates(REFERENCE, ["a frog"], PROMPTS)
    with pytest.raises(ValueError, match="choose one of: ours, reference"):
        get_protocol("threestudio")
    with pytest.raises(ValueError, match="choose one of"):
        runs.Evaluator(("divergence",), PROMPTS, protocol="theirs")
    assert OURS.metrics_file != REFERENCE.metrics_file and OURS.renders != REFERENCE.renders


# ---------------------------------------------------------------------------------------------
# the divergence rule on the scored views, against the reference's own computation


def reference_diverged(run):
    """scripts/evaluate.py's classify_diverged on the loaded views, written out with numpy as it does."""
    files = sorted((run / "renders_reference").glob("[0-9]*.png"), key=lambda p: int(p.stem))
    arrays = [np.asarray(iio.imread(p)).astype(np.float32) / 255.0 for p in files]
    if len(arrays) < 5:
        return True
    bad = sum(float(a.mean()) < 0.02 or float(a.std()) < 0.012 for a in arrays)
    return bad / len(arrays) > 0.5


@pytest.mark.parametrize("n_bad, kind", [(25, "black"), (26, "black"), (26, "flat"), (0, "black"), (50, "dim")])
def test_divergence_rule_on_the_scored_views_matches_the_reference(tmp_path, n_bad, kind):
    rng = np.random.default_rng(n_bad)
    bad = {"black": lambda: np.zeros((16, 16, 3)), "flat": lambda: np.full((16, 16, 3), 0.6),
           # just under the mean floor (0.02) in uint8 steps, with some spread
           "dim": lambda: rng.integers(0, 9, (16, 16, 3)) / 255.0}[kind]
    images = [bad() if k < n_bad else rng.uniform(0.1, 0.9, (16, 16, 3)) for k in range(50)]
    run = fake_reference_run(tmp_path, f"{kind}{n_bad}", images)
    evaluator = runs.Evaluator(("divergence",), PROMPTS, protocol="reference")
    result = runs.evaluate_run(run, evaluator)
    assert result["divergence"]["diverged"] == reference_diverged(run) == (n_bad > 25)
    assert result["divergence"]["degenerate_views"] == n_bad and result["views"] == 50
    assert "found" in result["renders"]  # no checkpoint: the views are used as they are
    assert json.loads((run / "metrics_reference.json").read_text())["protocol"] == "reference"
    assert not (run / "metrics.json").exists()


def test_a_missing_run_is_diverged_and_an_incomplete_one_without_checkpoint_is_refused(tmp_path, capsys):
    evaluator = runs.Evaluator(("divergence",), PROMPTS, protocol="reference")
    missing = runs.evaluate_run(tmp_path / "never-finished", evaluator)
    assert missing["missing"] and missing["divergence"]["diverged"] and missing["protocol"] == "reference"
    run = fake_reference_run(tmp_path, "partial", [np.full((16, 16, 3), 0.5)] * 4)  # 4 of the 50 views
    code, _, err = eval_cli([str(run), "--protocol", "reference", "--metrics", "divergence", "--prompts",
                             str(prompt_file(tmp_path))], capsys)
    assert code == 2 and "renders_reference" in err and "checkpoint.pt" in err and "--protocol ours" in err


def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# end to end on a tiny generated run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "run"
    argv = ["generate", PROMPT, "--model", "tiny", "--preset", "sds", "--budget", "2", "--resolution", "16",
            "--samples-per-ray", "8", "--eval-views", "4", "--eval-resolution", "16", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_eval_reference_end_to_end_renders_the_views_and_keeps_ours_apart(tiny_run, tiny_clip, tmp_path, capsys):
    models = ["--clip-b32", str(tiny_clip), "--clip-b16", str(tiny_clip), "--device", "cpu",
              "--prompts", str(prompt_file(tmp_path))]
    code, out, err = eval_cli([str(tiny_run), "--protocol", "reference", *models], capsys)
    assert code == 0, err
    assert "protocol=reference" in out and "views=50" in out
    result = json.loads((tiny_run / "metrics_reference.json").read_text())
    m = result["metrics"]
    assert result["protocol"] == "reference" and result["scored_views"] == REFERENCE_INDICES
    assert result["views"] == result["expected_views"] == 50 and "rendered now" in result["renders"]
    folder = tiny_run / "renders_reference"
    assert sorted(int(p.stem) for p in folder.glob("*.png")) == REFERENCE_INDICES
    # azimuth 0 is a camera of both protocols: the same pixels as generate's own front render
    assert np.array_equal(iio.imread(folder / "000.png"), iio.imread(tiny_run / "renders" / "000.png"))
    assert m["r_precision"]["candidates"] == len(PROMPTS)  # exactly the list: the run's prompt is in it
    assert len(m["clip_score"]["per_view"]) == 50
    # Janus: the cosine of turntable views 0 and 60 (the first and the middle of the 50)
    assert (m["janus"]["front_view"], m["janus"]["back_view"]) == (0, 60)
    scorer = cm.ClipScorer.load(str(tiny_clip), "t", "--clip-b32")
    e = scorer.embed_images(torch.stack(run_folder.load_images([folder / "000.png", folder / "060.png"])))
    assert m["janus"]["value"] == pytest.approx(cm.janus_score(e[0], e[1]), abs=1e-5)

    # ours afterwards: its own file, and the reference's is left as it was
    before = (tiny_run / "metrics_reference.json").read_text()
    code, _, err = eval_cli([str(tiny_run), *models], capsys)
    assert code == 0, err
    ours = json.loads((tiny_run / "metrics.json").read_text())
    assert ours["protocol"] == "ours" and ours["views"] == 4 and ours["metrics"]["janus"]["back_view"] == 2
    assert ours["metrics"]["r_precision"]["candidates"] == len(PROMPTS)  # the run's prompt is already listed
    assert (tiny_run / "metrics_reference.json").read_text() == before

    # again: the views rendered for this state of the run are reused, not rendered again
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, _, err = eval_cli([str(tiny_run), "--protocol", "reference", "--metrics", "divergence", *models], capsys)
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    again = json.loads((tiny_run / "metrics_reference.json").read_text())
    assert "rendered earlier" in again["renders"] and "clip_score" in again["metrics"]  # merged, as ours


def test_views_of_another_state_of_the_run_are_rendered_again(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    evaluator = runs.Evaluator(("divergence",), PROMPTS, protocol="reference")
    runs.evaluate_run(run, evaluator)
    manifest = json.loads((run / "renders_reference" / MANIFEST).read_text())
    assert manifest["views"]["indices"] == REFERENCE_INDICES and manifest["views"]["resolution"] == 16
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": summary["steps"] + 1}))  # trained further
    assert "rendered now" in runs.evaluate_run(run, evaluator)["renders"]


def test_reference_bad_inputs_exit_2(tiny_run, tiny_clip, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("a frog\na blue teapot\n")
    code, _, err = eval_cli([str(tiny_run), "--protocol", "reference", "--prompts", str(other),
                             "--clip-b32", str(tiny_clip)], capsys)
    assert code == 2 and "lacks the prompt(s) ['a wooden chair']" in err and "--prompts FILE" in err
    with pytest.raises(SystemExit) as info:  # argparse names the choices
        eval_cli([str(tiny_run), "--protocol", "threestudio"], capsys)
    assert info.value.code == 2 and "ours" in capsys.readouterr().err
