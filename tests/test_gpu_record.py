"""benchmarks/gpu_record.py (issue 14): the one-call GPU script, run here in its CPU --tiny mode.

The end-to-end test runs the script as the device will (a subprocess) with the smallest settings;
the others call its main() in-process, where a section can be made to fail cheaply.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_record.py"
SECTIONS = ("setup", "speed", "fast_paths", "generate", "testbed")
# the smallest run that still goes through every section's code
TINY = ["--device", "cpu", "--tiny", "--resolutions", "16", "--guidance", "sdi", "--views", "1", "2",
        "--generate-views", "1", "--compile-estimate-seconds", "100000", "--testbed-estimate-seconds", "100000",
        "--field-compile-estimate-seconds", "100000"]


@pytest.fixture(scope="module")
def gpu_record():
    spec = importlib.util.spec_from_file_location("gpu_record", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(out: Path) -> dict:
    return json.loads((out / "gpu_record.json").read_text())


def test_the_cpu_tiny_run_records_every_section(tmp_path):
    out = tmp_path / "record"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--budget-seconds", "240", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read(out)
    sections = record["sections"]
    assert tuple(sections) == SECTIONS
    assert [sections[s]["status"] for s in SECTIONS[:4]] == ["done"] * 4, {s: sections[s]["status"] for s in SECTIONS}
    assert sections["testbed"]["status"].startswith("skipped: time")
    env_rec = record["environment"]
    assert env_rec["torch"] == torch.__version__ and env_rec["versions"]["diffusers"] and "device" in env_rec
    assert record["date"] and "--tiny" in record["command"]

    speed = sections["speed"]["rows"]
    assert [(r["views"], r["status"]) for r in speed] == [(1, "measured"), (2, "measured")]
    for row in speed:
        assert row["ms_per_evaluation"] > 0 and row["projected_10k_minutes"] > 0 and row["warmup_seconds"] > 0
        assert set(row["breakdown_ms_per_evaluation"]) >= {"render", "vae_encode", "unet", "backward", "optimiser"}
        assert row["unet_passes_per_evaluation"] > 1  # SDI inverts: several denoiser passes per evaluation
        assert row["peak_memory_gib"] is None  # no GPU

    fast = {(r["fast_unet"], r["targets"]): r for r in sections["fast_paths"]["rows"] if r["field_mode"] == "eager"}
    assert fast["off", "sequential"]["source"] == "speed section"  # the CPU default: reused, not re-measured
    assert fast["off", "batched"]["status"] == "measured" and "source" not in fast["off", "batched"]
    assert fast["off", "batched"]["unet_calls_per_evaluation"] < fast["off", "sequential"]["unet_calls_per_evaluation"]
    assert fast["cuda_graph", "sequential"]["status"] == "skipped: needs CUDA"
    assert fast["compile", "sequential"]["status"].startswith("skipped: time")
    field = {r["field_mode"]: r for r in sections["fast_paths"]["rows"] if r["field_mode"] != "eager"}
    assert field["compiled"]["status"].startswith("skipped: time")  # its warm-up estimate is set out of reach
    assert field["bf16-mlp"]["status"] == "measured" and field["bf16-mlp"]["ms_per_evaluation"] > 0
    assert (out / "fast_paths" / "field-bf16-mlp" / "speed.json").is_file()
    assert "| off | bf16-mlp | sequential |" in (out / "gpu_record.md").read_text()

    (run,) = sections["generate"]["runs"]
    assert run["status"] == "measured" and run["views"] == 1 and run["guidance_evaluations"] == 4
    assert run["train_seconds"] > 0 and run["peak_process_memory_gib"] > 0

    targets = record["targets"]
    assert targets["a_10k_run_minutes"]["status"] in ("met", "not met")
    fastest = min(r["projected_10k_minutes"] for r in (fast["off", "batched"], fast["off", "sequential"],
                                                        field["bf16-mlp"]))
    assert targets["a_10k_run_minutes"]["value_minutes"] == pytest.approx(fastest)
    assert targets["b_wall_over_unet"]["status"] in ("met", "not met")
    assert targets["c_memory_k4_over_k1"]["status"] == "not measured"  # no GPU, and K=4 was left out
    assert all("stand-in" in t["note"] for t in targets.values())

    md = (out / "gpu_record.md").read_text()
    for heading in ("## Targets", "## Sections", "## Speed", "## Fast paths", "## mvsdi generate", "## Testbed"):
        assert heading in md
    assert "skipped: time" in md and (out / "generate" / "k1" / "summary.json").is_file()


def test_a_too_small_budget_skips_everything_rather_than_crashing(gpu_record, tmp_path, capsys):
    out = tmp_path / "record"
    assert gpu_record.main([*TINY, "--resolutions", "16", "32", "--budget-seconds", "0", "--out", str(out)]) == 0
    sections = read(out)["sections"]
    assert sections["setup"]["status"] == "done"
    rows = sections["speed"]["rows"] + sections["fast_paths"]["rows"] + sections["generate"]["runs"]
    assert len(rows) == 4 + 4 + 2 + 1  # speed, fast paths of the UNet and of the field, generate
    assert all(r["status"].startswith("skipped:") for r in rows)
    assert sum(r["status"].startswith("skipped: time") for r in rows) == len(rows) - 1  # and cuda_graph: no CUDA
    assert all(sections[s]["status"].startswith("skipped: time") for s in SECTIONS[1:])
    assert all(t["status"] == "not measured" for t in read(out)["targets"].values())
    assert "skipped: time" in (out / "gpu_record.md").read_text()


def test_a_failing_section_is_recorded_and_the_later_sections_still_run(gpu_record, tmp_path, capsys):
    out = tmp_path / "record"
    argv = [*TINY, "--views", "2", "--fast-unet-modes", "--field-modes", "--skip", "generate", "testbed",
            "--fail-section", "speed",
            "--budget-seconds", "200", "--out", str(out)]
    assert gpu_record.main(argv) == 0
    sections = read(out)["sections"]
    assert sections["speed"]["status"] == "error: RuntimeError: forced failure in section 'speed' (--fail-section)"
    assert "Traceback" in sections["speed"]["traceback"]
    assert sections["fast_paths"]["status"] == "done"
    rows = sections["fast_paths"]["rows"]
    assert [r["status"] for r in rows] == ["measured", "measured"]  # nothing to reuse: both measured here
    assert [sections[s]["status"] for s in ("generate", "testbed")] == ["skipped: --skip"] * 2
    assert read(out)["targets"]["a_10k_run_minutes"]["status"] in ("met", "not met")


def test_an_out_of_memory_at_the_larger_resolution_keeps_the_smaller_rows(gpu_record, tmp_path, monkeypatch, capsys):
    real = gpu_record.timed_measure

    def out_of_memory_at_32(session, row, steps):
        if row["resolution"] == 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(session, row, steps)

    monkeypatch.setattr(gpu_record, "timed_measure", out_of_memory_at_32)
    out = tmp_path / "record"
    argv = [*TINY, "--resolutions", "16", "32", "--views", "1", "--skip", "fast_paths", "generate", "testbed",
            "--budget-seconds", "200", "--out", str(out)]
    assert gpu_record.main(argv) == 0
    speed = read(out)["sections"]["speed"]
    assert speed["status"] == "done"
    assert [(r["resolution"], r["status"]) for r in speed["rows"]] == [
        (16, "measured"), (32, "error: OutOfMemoryError: CUDA out of memory (simulated)")]


def test_wheels_are_installed_into_the_target_before_anything_else(gpu_record, tmp_path, capsys):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    write_wheel(wheels / "gpurecordprobe-0.1-py3-none-any.whl", "gpurecordprobe")
    argv = [*TINY, "--wheels", str(wheels), "--wheel-target", str(target), "--budget-seconds", "0",
            "--out", str(tmp_path / "record")]
    try:
        assert gpu_record.main(argv) == 0
        setup = read(tmp_path / "record")["sections"]["setup"]
        assert setup["wheels"]["status"] == "installed", setup["wheels"]
        assert (target / "gpurecordprobe" / "__init__.py").is_file()
        assert importlib.util.find_spec("gpurecordprobe") is not None
    finally:
        if str(target) in sys.path:
            sys.path.remove(str(target))


def write_wheel(path: Path, name: str) -> None:
    """The smallest wheel pip accepts: one module, METADATA, WHEEL, RECORD."""
    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


def test_no_wheels_in_the_folder_is_recorded_not_fatal(gpu_record, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [*TINY, "--wheels", str(tmp_path / "empty"), "--budget-seconds", "0", "--out", str(tmp_path / "record")]
    assert gpu_record.main(argv) == 0
    assert read(tmp_path / "record")["sections"]["setup"]["wheels"]["status"].startswith("error: no .whl files")


def test_a_child_that_overruns_its_time_is_stopped(gpu_record, tmp_path):
    began = time.perf_counter()
    result = gpu_record.run_bounded([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                    1.0, tmp_path / "log.txt", dict(os.environ))
    assert result["timed_out"] and result["returncode"] != 0 and time.perf_counter() - began < 20
    assert "started" in result["tail"]


def test_a_fast_path_child_runs_speed_py_and_its_row_is_read_back(gpu_record, tmp_path):
    """The subprocess route of --fast-unet compile, here with the UNet eager (a CPU compile takes minutes)."""
    session = gpu_record.Session(gpu_record.parse_args([*TINY, "--out", str(tmp_path)]), [])
    session.device = torch.device("cpu")
    session.section("setup")["field"] = "small"
    gpu_record.put_on_path(session, ROOT / "src")  # as on the device, where mvsdi is not installed
    row = {"guidance": "sdi", "views": 2, "resolution": 16, "targets": "batched", "fast_unet": "off", "steps": 1}
    gpu_record.run_speed_subprocess(session, row, 300.0)
    assert row["status"] == "measured", row
    assert row["ms_per_evaluation"] > 0 and row["warmup_seconds"] > 0 and row["unet_calls_per_evaluation"] == 4.5
    assert 0 < session.subprocess_overhead < row["child_seconds"] and row["wall_seconds"] < row["child_seconds"]
    assert (tmp_path / "fast_paths" / "off" / "speed.json").is_file()


def measured(guidance="sdi", views=2, resolution=16, ms=100.0, render=30.0, backward=20.0, wall=3.0, steps=1,
             targets="batched", fast_unet="off", **extra):
    parts = {"render": render, "vae_encode": 5.0, "unet": 40.0, "backward": backward, "optimiser": 1.0, "other": 4.0}
    return {"guidance": guidance, "views": views, "resolution": resolution, "targets": targets, "fast_unet": fast_unet,
            "status": "measured", "ms_per_evaluation": ms, "breakdown_ms_per_evaluation": parts, "wall_seconds": wall,
            "steps": steps, "projected_10k_minutes": ms * 10_000 / 60_000, "total_over_unet": ms / 40.0, **extra}


def session_with(gpu_record, tmp_path, rows, *argv):
    session = gpu_record.Session(gpu_record.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv]), [])
    session.record["sections"]["speed"] = {"status": "done", "rows": rows}
    return session


def test_estimates_scale_the_pixel_work_and_fall_back_to_one_step(gpu_record, tmp_path):
    session = session_with(gpu_record, tmp_path, [measured(resolution=128, steps=2)])
    row = {"guidance": "sdi", "views": 2, "resolution": 256, "targets": "batched"}
    # render + backward (50 ms) grow 4x with the pixels, the other 50 ms do not: 250 ms at 256²
    assert gpu_record.predict_ms(measured(resolution=128), 256) == pytest.approx(250.0)
    assert gpu_record.estimate_measure(session, row, 2) == pytest.approx(1.5 * 3.0 * 2.5)
    assert gpu_record.choose_steps(session, row, 100.0) == (2, pytest.approx(11.25))
    assert gpu_record.choose_steps(session, row, 6.0) == (1, pytest.approx(5.625))
    steps, estimate = gpu_record.choose_steps(session, row, 5.0)
    assert steps is None and estimate == pytest.approx(5.625)
    # nothing measured yet: the first guess of the device kind
    empty = session_with(gpu_record, tmp_path, [])
    assert gpu_record.estimate_measure(empty, row, 1) == gpu_record.FIRST_GUESS_S["cpu"]


def test_targets_say_met_not_met_or_not_measured(gpu_record, tmp_path):
    at_512 = dict(resolution=512)
    session = session_with(gpu_record, tmp_path, [
        measured(views=2, ms=100.0, **at_512),  # 16.7 min
        measured(views=1, ms=200.0, peak_memory_gib=10.0, **at_512),
        measured(views=4, ms=150.0, peak_memory_gib=10.5, **at_512)], "--resolutions", "128", "512")
    session.record["sections"]["fast_paths"] = {"rows": [measured(views=2, ms=70.0, fast_unet="cuda_graph", **at_512)]}
    t = gpu_record.evaluate_targets(session)
    assert t["a_10k_run_minutes"]["status"] == "met" and "cuda_graph" in t["a_10k_run_minutes"]["setting"]
    assert t["a_10k_run_minutes"]["value_minutes"] == pytest.approx(70.0 * 10_000 / 60_000)
    # (b) is read on the same (fastest) row: 70 ms over its 40 ms of UNet
    assert t["b_wall_over_unet"]["status"] == "met" and t["b_wall_over_unet"]["value_ratio"] == pytest.approx(1.75)
    assert t["c_memory_k4_over_k1"]["status"] == "met"
    assert t["c_memory_k4_over_k1"]["value_ratio"] == pytest.approx(1.05)
    assert all("note" not in v for v in t.values())  # the issue's own setting: no stand-in note

    slow = session_with(gpu_record, tmp_path, [measured(views=2, ms=300.0, **at_512),
                                               measured(views=4, ms=300.0, peak_memory_gib=12.0, **at_512)],
                        "--resolutions", "512")
    t = gpu_record.evaluate_targets(slow)
    assert [t[k]["status"] for k in t] == ["not met", "not met", "not measured"]
    # K=1 missing from the speed rows: the generate runs' peaks are used instead
    slow.record["sections"]["generate"] = {"runs": [{"views": 1, "status": "measured", "peak_gpu_memory_gib": 10.0},
                                                    {"views": 4, "status": "measured", "peak_gpu_memory_gib": 12.0}]}
    c = gpu_record.evaluate_targets(slow)["c_memory_k4_over_k1"]
    assert c["status"] == "not met" and c["source"] == "mvsdi generate runs"


def test_the_device_testbed_section_measures_the_full_settings_cost(gpu_record):
    """`mvsdi testbed --full` takes its 8-minute limit; the record asks for its cost per cell instead."""
    from types import SimpleNamespace

    session = SimpleNamespace(args=gpu_record.parse_args(["--device", "cuda"]), device="cuda")
    cmd = gpu_record.testbed_command(session, Path("unused"))
    assert Path(cmd[1]) == ROOT / "benchmarks" / "testbed_cost.py"
    assert cmd[2:] == ["--setting", "full", "--device", "cuda", "--workers", "8", "--budget", "20"]
