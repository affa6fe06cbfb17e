"""A run that survives: Ctrl-C, kills between write and rename, resume, NaN rollbacks, full disks, OOM."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mvsdi import cli
from mvsdi.config import preset
from mvsdi.distill import Distiller, Model, train
from mvsdi.generate import collapse_kind
from mvsdi.priors.stable_diffusion import StableDiffusionPrior

# K=2, budget 8: four steps, a checkpoint after each
TINY = ["--model", "tiny", "--preset", "mvsds-k2", "--budget", "8", "--resolution", "16", "--samples-per-ray", "8",
        "--eval-views", "2", "--eval-resolution", "16", "--checkpoint-every", "1", "--no-progress"]


def _generate(out, *extra):
    return cli.main(["generate", "a wooden chair", *TINY, "--out", str(out), *extra])


def _weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    for part in ("field", "background"):
        assert wa[part].keys() == wb[part].keys()
        for name in wa[part]:
            assert torch.equal(wa[part][name], wb[part][name]), f"{part}.{name} differs"


def _log_without_times(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("wall_s")
    return records


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _generate(out) == 0
    return out


def _interrupt_after(monkeypatch, steps, presses=1):
    """Send real SIGINTs to this process once the loop has done ``steps`` steps."""
    original = Distiller.step

    def step(self):
        record = original(self)
        if self.counters.steps == steps:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Distiller, "step", step)


def test_ctrl_c_once_saves_and_resume_ends_where_an_uninterrupted_run_ends(uninterrupted, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    # not 0: `generate && export` must not carry on with an unfinished run
    assert _generate(out) == 130
    err = capsys.readouterr().err
    assert "keeping the checkpoint of step 1" in err  # the first press says what a second would keep
    assert "stopped after 2 of 4 steps" in err and f"--resume {out}" in err
    summary = _summary(out)
    assert summary["status"] == "interrupted" and summary["steps"] == 2
    assert len(list((out / "renders").glob("[0-9]*.png"))) == 2  # outputs of the current state
    monkeypatch.undo()

    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert _summary(out)["status"] == "completed"
    assert _summary(out)["guidance_evaluations"] == _summary(uninterrupted)["guidance_evaluations"] == 8
    assert _summary(out)["resumed_at"] == {"step": 2, "guidance_evaluations": 4}
    _assert_same_weights(out, uninterrupted)
    assert _log_without_times(out) == _log_without_times(uninterrupted)


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 3, presses=2)
    assert _generate(out) == 130
    assert not out.exists()
    partial = tmp_path / ".run.partial"
    assert torch.load(partial / "checkpoint.pt", weights_only=True)["counters"]["steps"] == 2
    err = capsys.readouterr().err
    assert "keeping the checkpoint of step 2" in err and f"unfinished run is kept at {partial}" in err
    assert f"--resume {out}" in err
    monkeypatch.undo()

    # a new run does not silently delete the unfinished one
    assert _generate(out) == 2
    assert "unfinished run" in capsys.readouterr().err and partial.is_dir()
    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert not partial.exists()
    _assert_same_weights(out, uninterrupted)


def test_two_quick_ctrl_cs_before_the_first_checkpoint_still_keep_the_run(uninterrupted, tmp_path, monkeypatch,
                                                                          capsys):
    """No checkpoint is due before the end: the second press waits for the one the stop saves."""
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2, presses=2)
    assert _generate(out, "--checkpoint-every", "100") == 130
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and "first checkpoint" in err and f"--resume {out}" in err
    assert _summary(out)["status"] == "interrupted"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["counters"]["steps"] == 2
    monkeypatch.undo()
    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_weights(out, uninterrupted)  # the steps before the presses were not lost


def test_a_third_ctrl_c_before_the_first_checkpoint_stops_at_once_and_says_nothing_was_kept(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2, presses=3)
    assert _generate(out, "--checkpoint-every", "100") == 130
    assert "nothing was kept" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_a_kill_between_write_and_rename_leaves_the_previous_checkpoint(uninterrupted, tmp_path):
    """The process dies (no cleanup, no handler) while replacing the third checkpoint."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        from mvsdi import cli
        real_replace, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if str(dst).endswith("checkpoint.pt") and len([c for c in calls if str(c).endswith("checkpoint.pt")]) == 3:
                os._exit(9)  # killed after the temporary file is written, before the rename
            real_replace(src, dst)
        os.replace = replace
        cli.main(["generate", "a wooden chair", *{TINY!r}, "--out", {str(out)!r}])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 9
    partial = tmp_path / ".run.partial"
    assert list(partial.glob(".checkpoint.pt.*.tmp")), "the simulated kill should leave the temporary file"
    assert torch.load(partial / "checkpoint.pt", weights_only=True)["counters"]["steps"] == 2
    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert not list(out.glob(".*.tmp")), "the killed write's temporary file must not end up in the run"
    _assert_same_weights(out, uninterrupted)


def test_resume_refuses_a_different_config_or_version_unless_forced(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 1)
    assert _generate(out) == 130  # saved as "interrupted"
    monkeypatch.undo()
    before = (out / "checkpoint.pt").read_bytes()
    assert cli.main(["generate", "--resume", str(out), "--budget", "16", "--no-progress"]) == 2
    assert "budget: 8 → 16" in capsys.readouterr().err
    monkeypatch.setattr("mvsdi.__version__", "99.0.0")
    assert cli.main(["generate", "--resume", str(out), "--no-progress"]) == 2
    assert "mvsdi version" in capsys.readouterr().err
    monkeypatch.undo()
    # a device the machine lacks (the run was made on another?) is refused before anything is staged
    assert cli.main(["generate", "--resume", str(out), "--device", "tpu", "--no-progress"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before and not (tmp_path / ".run.partial").exists()
    assert cli.main(["generate", "--resume", str(out), "--force", "--no-progress"]) == 0
    assert _summary(out)["status"] == "completed"


def test_resume_of_a_completed_run_or_of_nothing_is_refused(uninterrupted, tmp_path, capsys):
    assert cli.main(["generate", "--resume", str(uninterrupted), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["generate", "--resume", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (uninterrupted.parent / f".{uninterrupted.name}.partial").exists()


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_folder):
    return StableDiffusionPrior(str(tiny_sd_folder), device="cpu")


def _distiller(prior, **overrides):
    config = preset("mvsds-k2", "a wooden chair", model="tiny", device="cpu", budget=12, resolution=16,
                    samples_per_ray=8, checkpoint_every=2, max_consecutive_skips=2, **overrides)
    return Distiller(config, prior, Model.create(config, torch.device("cpu")), torch.device("cpu"))


def _poison(monkeypatch, when):
    """Make each view's guidance loss NaN whenever ``when(distiller)`` holds."""
    import mvsdi.distill as distill_module

    real = distill_module.guidance_loss
    state = {}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if when(state["distiller"]) else value

    monkeypatch.setattr(distill_module, "guidance_loss", loss)
    return state


def test_nan_steps_are_skipped_then_rolled_back_to_the_last_checkpoint(tiny_prior, monkeypatch):
    distiller = _distiller(tiny_prior, max_rollbacks=2)
    # steps 4 and 5 fail on the first trajectory only: two skips in a row → back to the checkpoint at 4,
    # where fresh random streams succeed
    state = _poison(monkeypatch, lambda d: d.counters.rollbacks == 0 and d.counters.steps in (4, 5))
    state["distiller"] = distiller
    result = train(distiller)
    assert result.status == "completed"
    assert result.events == [{"event": "rollback", "at_step": 5, "to_step": 4}]
    c = distiller.counters
    assert (c.steps, c.skipped_steps, c.rollbacks) == (6, 2, 1)
    assert c.guidance_evaluations == 12 + 2 * 2  # the two discarded steps were spent too
    assert all(torch.isfinite(p).all() for p in distiller.model.parameters())


def test_a_run_that_keeps_failing_ends_diverged_at_its_last_good_state(tiny_prior, monkeypatch):
    distiller = _distiller(tiny_prior, max_rollbacks=1)
    state = _poison(monkeypatch, lambda d: d.counters.steps >= 2)
    state["distiller"] = distiller
    checkpoints = []
    result = train(distiller, on_checkpoint=checkpoints.append)
    assert result.status == "diverged"
    assert distiller.counters.steps == 2 and distiller.counters.rollbacks == 1
    good = checkpoints[-1]["model"]["field"]
    for name, value in distiller.model.field.state_dict().items():
        assert torch.equal(value, good[name])


def _records_of_the_run(records):
    """The log lines without their times, nor the prior's running counts (the module's prior is shared)."""
    return [{key: value for key, value in r.to_log().items() if key not in ("wall_s", "unet_calls", "unet_images")}
            for r in records]


def _field_state(distiller):
    return {name: value.clone() for name, value in distiller.model.field.state_dict().items()}


def test_train_until_a_step_then_on_is_the_same_run_as_one_call(tiny_prior):
    whole, records = _distiller(tiny_prior), []
    assert train(whole, on_step=records.append).status == "completed"
    pieces, piece_records = _distiller(tiny_prior), []
    statuses = [train(pieces, on_step=piece_records.append, until_step=until).status for until in (2, 2, 5, None)]
    assert statuses == ["paused", "paused", "paused", "completed"]  # a second call at step 2 runs nothing
    assert pieces.counters == whole.counters and pieces.counters.steps == pieces.config.steps == 6
    assert _records_of_the_run(piece_records) == _records_of_the_run(records)
    assert all(torch.equal(a, b) for a, b in zip(_field_state(pieces).values(), _field_state(whole).values()))
    with pytest.raises(ValueError, match="steps 0 to 6"):
        train(pieces, until_step=7)


def test_the_progress_bar_counts_redone_steps_in_its_total(tiny_prior, monkeypatch):
    """A rollback returns the step counter while evaluations spent keep counting: the bar's total
    grows by the redone steps' evaluations, so it never runs past it and ends full."""
    from mvsdi.generate import Progress

    distiller = _distiller(tiny_prior, max_rollbacks=2)
    state = _poison(monkeypatch, lambda d: d.counters.rollbacks == 0 and d.counters.steps in (4, 5))
    state["distiller"] = distiller
    bar = Progress(distiller.config, enabled=True, counters=distiller.counters)
    seen = []

    def on_step(record):
        bar(record)
        seen.append((bar.bar.n, bar.bar.total))

    assert train(distiller, on_step=on_step).events  # one rollback: steps 4 and 5 run again
    bar.close()
    assert all(n <= total for n, total in seen)
    assert seen[0] == (2, 12) and seen[-1] == (16, 16) == (distiller.counters.guidance_evaluations,) * 2


def test_collapse_kinds():
    assert collapse_kind(torch.zeros(3, 4, 4, 1)) == "empty"
    assert collapse_kind(torch.ones(3, 4, 4, 1)) == "saturated"
    mixed = torch.zeros(3, 4, 4, 1)
    mixed[1, :2] = 1.0
    assert collapse_kind(mixed) is None


def test_summary_and_tensorboard_of_a_completed_run(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = _summary(uninterrupted)
    assert summary["status"] == "completed" and summary["collapse"] is None
    assert (summary["steps"], summary["rollbacks"], summary["skipped_steps"]) == (4, 0, 0)
    assert {"mvsdi", "torch", "diffusers"} <= set(summary["versions"])
    events = EventAccumulator(str(uninterrupted / "tensorboard")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/t_mean", "train/lr", "train/grad_norm", "train/unet_calls"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]  # x axis: evaluations spent
    assert tags["images"], "validation images are logged"


def test_a_full_disk_fails_before_training(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert _generate(tmp_path / "run") == 2
    assert "not enough free disk space" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_out_of_memory_names_the_knobs_that_lower_memory(tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("mvsdi.distill.train", oom)
    monkeypatch.setattr("mvsdi.generate.train", oom)
    assert _generate(tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert "--resolution" in err and "--samples-per-ray" in err and "K (--views) is not one of the knobs" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()
