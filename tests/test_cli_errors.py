"""The rough edges a new user hit (issue 10): devices, file modes, folders that are not runs,
--version and --help, the progress bar's last line. Each a clear message and an exit code."""

import io
import os
import stat

import pytest
import torch

from mvsdi import cli
from mvsdi.atomic_files import atomic_torch_save, atomic_write_bytes, atomic_write_json
from mvsdi.priors.loading import resolve_device
from mvsdi.rundir import RunDirectoryError, read_checkpoint

# ------------------------------------------------------------------------------------------------
# --device


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["tpu", "TPU", "", "gpu", "cuda:x", "cuda:-1", "cuda:0:1", "xla", "meta", "cpu:0"])
def test_unknown_devices_name_what_is_valid(no_gpu, device):
    with pytest.raises(ValueError) as info:
        resolve_device(device)
    message = str(info.value)
    assert f"unknown device {device!r}" in message
    assert "auto, cpu, cuda, cuda:N" in message and "mps" in message
    assert "this machine can use: auto, cpu" in message


def test_devices_this_machine_lacks_say_what_to_use(no_gpu, two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
            resolve_device(device)
    with pytest.raises(ValueError, match="no usable MPS"):
        resolve_device("mps")


def test_a_gpu_index_past_the_last_gpu_is_refused(no_gpu, two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\); use one of: auto, cpu, cuda, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_valid_devices(no_gpu, monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("command", [
    ["generate", "a chair", "--model", "tiny", "--budget", "2", "--preset", "sdi"],
    ["export", "{tmp}"],
    ["testbed", "--budget", "4", "--out", "{tmp}/study"],
])
@pytest.mark.parametrize("device", ["tpu", "mps"])
def test_every_command_turns_a_bad_device_into_exit_2(no_gpu, command, device, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main([*argv, "--device", device]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and repr(device) in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ------------------------------------------------------------------------------------------------
# file modes of atomic writes


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_atomic_writes_get_the_mode_a_plain_open_would(umask, mask, mode, tmp_path):
    umask(mask)
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_bytes(tmp_path / "table.md", b"x")
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    atomic_torch_save(tmp_path / "checkpoint.pt", {"w": torch.zeros(2)})
    atomic_write_bytes(tmp_path / "table.md", b"replaced")  # replacing an existing file too
    for name in ("plain.txt", "table.md", "summary.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["w"].tolist() == [0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "plain.txt", "summary.json", "table.md"]


class Unsaveable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def test_a_failed_atomic_write_leaves_neither_a_temporary_file_nor_a_changed_target(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="cannot be saved"):
        atomic_torch_save(target, {"state": Unsaveable()})
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ------------------------------------------------------------------------------------------------
# a folder that is not a run


def test_export_of_a_folder_that_is_not_a_run_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert cli.main(["export", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not an mvsdi run directory (no config.json)" in err
    assert "the folder `mvsdi generate` wrote" in err and "first checkpoint" not in err


def test_reading_a_missing_or_unfinished_run_says_where_it_is(tmp_path):
    with pytest.raises(RunDirectoryError, match="does not exist; give the folder `mvsdi generate` wrote"):
        read_checkpoint(tmp_path / "nothing")
    partial = tmp_path / ".run.partial"
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(RunDirectoryError, match=r"unfinished run of it is at .*\.run\.partial.*--resume"):
        read_checkpoint(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file, not an mvsdi run directory"):
        read_checkpoint(tmp_path / "file")


def test_a_run_without_a_checkpoint_still_says_it_never_reached_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match="never reached its first checkpoint"):
        read_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# --version, --help


def test_version(capsys):
    import mvsdi

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mvsdi {mvsdi.__version__}"


def test_generate_help_explains_seed_samplers_models_and_exit_codes(capsys):
    from mvsdi.cameras import SAMPLERS

    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert "seeds the field's initialisation" in text and "same seed and options give the same run" in text
    for name, sampler in SAMPLERS.items():  # the rules check_sampler enforces, whatever they are
        assert f"{name} {sampler.rule}" in text
    assert "'ideal' or 'ideal:N'" in text and "must name a scene" in text
    assert "validation/ (<evaluations>_viewN.png" in text
    assert "130 interrupted by Ctrl-C" in text and "2 bad input" in text and "3 out of GPU memory" in text


# ------------------------------------------------------------------------------------------------
# the progress bar


def test_the_progress_bar_draws_its_last_line_once(monkeypatch):
    from mvsdi import generate as generate_module
    from mvsdi.config import preset
    from mvsdi.generate import Progress
    from mvsdi.step_record import StepRecord

    stream = io.StringIO()
    real = generate_module.tqdm
    monkeypatch.setattr(generate_module, "tqdm",
                        lambda *a, **k: real(*a, **k, file=stream, mininterval=0, miniters=1))
    bar = Progress(preset("sds", "a chair", budget=4), enabled=True)
    for spent in range(1, 5):
        bar(StepRecord(step=spent - 1, fraction=(spent - 1) / 4, t=[900 - spent], loss=1.0 / spent, loss_terms={},
                       guidance_evaluations=spent, unet_calls=2 * spent, unet_calls_step=2, unet_images=4 * spent,
                       lr=0.01, levels=8, shading=["albedo"], grad_norm=1.0, skipped=False, batched_views=False,
                       samples_per_ray_evaluated=8.0, aggregation={}))
    bar.close()
    lines = [line for line in stream.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    assert sum("100%" in line for line in lines) == 1
    assert "4/4" in lines[-1] and "loss=0.25" in lines[-1] and "unet=8" in lines[-1]
    assert "1/4" in lines[1] and "loss=1," in lines[1] and "unet=2" in lines[1]  # each line: its own step's values
