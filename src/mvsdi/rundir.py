"""The run directory: where a run writes its config, log, checkpoint, renders and video.

A run is written into a staging folder beside the requested one (``.NAME.partial``) and moved into
place only when it completes, so a failed or interrupted run never leaves a half-written directory
where a good one was. Files inside are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import torch

from mvsdi.atomic_files import TEMPORARY_FILES, atomic_torch_save, atomic_write_bytes, atomic_write_json
from mvsdi.config import RunConfig
from mvsdi.distill import Model
from mvsdi.images import to_uint8

CONFIG = "config.json"
LOG = "log.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
RENDERS = "renders"
VALIDATION = "validation"  # the validation renders of the run, as in TensorBoard
TURNTABLE = "turntable.mp4"


def prompt_slug(prompt: str) -> str:
    """A prompt as a folder name: lowercase words joined by '-', at most 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "run"


class RunDirectoryError(RuntimeError):
    pass


class RunDirectory:
    """A run being written: ``path`` is the staging folder until ``commit`` moves it to ``final``.

    A staging folder that holds a checkpoint is an unfinished run (killed, or stopped by a second
    Ctrl-C): it is kept, never silently deleted, and ``resume`` continues it.
    """

    def __init__(self, final: Path, overwrite: bool = False, resume: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite
        self.copied_final = False  # resume: the staging folder is a fresh copy of final
        self.path = self.final.parent / f".{self.final.name}.partial"
        if self.final.exists() and not self.final.is_dir():
            raise RunDirectoryError(f"output path {self.final} exists and is not a directory; choose another --out")
        try:
            self._resume() if resume else self._start()
            probe = self.path / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirectoryError(f"cannot write under {self.final.parent}: {exc}. Choose a writable --out.") from exc
        self._log = open(self.path / LOG, "a", buffering=1)

    def _start(self) -> None:
        if self.final.is_dir() and any(self.final.iterdir()) and not self.overwrite:
            raise RunDirectoryError(
                f"output directory {self.final} already holds files (a previous run?); nothing was changed. "
                "Choose another --out, or pass --overwrite to replace it once the new run completes.")
        if (self.path / CHECKPOINT).is_file() and not self.overwrite:
            raise RunDirectoryError(
                f"an unfinished run of {self.final} is at {self.path}; nothing was changed. Continue it with "
                f"`mvsdi generate --resume {self.final}`, or pass --overwrite to discard it.")
        if self.path.exists():
            shutil.rmtree(self.path)
        (self.path / RENDERS).mkdir(parents=True)

    def _resume(self) -> None:
        """Continue in the staging folder: the unfinished one if it has a checkpoint, else a copy of ``final``."""
        if (self.path / CHECKPOINT).is_file():
            for stray in self.path.glob(TEMPORARY_FILES):  # temporary files of a write that a kill cut short
                stray.unlink()
            return
        if not (self.final / CHECKPOINT).is_file():
            raise RunDirectoryError(f"nothing to resume at {self.final}: neither it nor {self.path} holds a "
                                    f"{CHECKPOINT}. Start the run without --resume.")
        if self.path.exists():
            shutil.rmtree(self.path)
        shutil.copytree(self.final, self.path)
        self.copied_final = True
        (self.path / SUMMARY).unlink(missing_ok=True)  # the staged copy is not a finished run

    def abandon_resume(self) -> None:
        """Before training: drop a staged copy of ``final`` (the original is intact), keep an unfinished run."""
        if self.copied_final:
            self.discard()
        else:
            self.close()

    def truncate_log(self, steps: int) -> None:
        """Drop log records of steps at or after ``steps`` (written after the checkpoint resumed from)."""
        self._log.close()
        path = self.path / LOG
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", -1) < steps]
        atomic_write_bytes(path, "".join(kept).encode())
        self._log = open(path, "a", buffering=1)

    def drop_validation_after(self, evaluations: int) -> None:
        """Remove validation renders made after ``evaluations`` (by the steps a resume runs again)."""
        for image in (self.path / VALIDATION).glob("*_view*.png"):
            spent = image.name.partition("_")[0]
            if spent.isdigit() and int(spent) > evaluations:
                image.unlink()

    def final_is_completed(self) -> bool:
        """Whether ``final`` holds a run that completed (which an interrupted one must not replace)."""
        return read_summary(self.final).get("status") == "completed"

    def check_free_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.path).free
        if free < needed_bytes:
            raise RunDirectoryError(
                f"not enough free disk space under {self.final.parent}: the run needs about "
                f"{needed_bytes / 2**20:.0f} MiB (checkpoints, renders, video), {free / 2**20:.0f} MiB are free. "
                "Free some space or choose another --out; nothing was trained.")

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / CONFIG, config)

    def log(self, record: dict[str, Any]) -> None:
        self._log.write(json.dumps(record) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def save_image(self, name: str, image: torch.Tensor, folder: str = RENDERS) -> Path:
        """A PNG in ``folder`` of the run (made on first use, e.g. ``VALIDATION``)."""
        (self.path / folder).mkdir(exist_ok=True)
        path = self.path / folder / name
        iio.imwrite(path, to_uint8(image))
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()

    def commit(self) -> Path:
        """Move the completed run into place, replacing an old run only now that the new one exists."""
        self.close()
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}.replaced"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.path, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        self.path = self.final
        return self.final

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()


# ---------------------------------------------------------------------------------------------
# reading a run back


def _not_a_run(run: Path) -> str | None:
    """Why ``run`` is no run directory at all (None if it looks like one), and what to give instead."""
    if run.is_dir():
        if any((run / name).is_file() for name in (CONFIG, CHECKPOINT, SUMMARY)):
            return None
        return (f"{run} is not an mvsdi run directory (no {CONFIG}); give the folder `mvsdi generate` wrote "
                "(its --out)")
    partial = run.parent / f".{run.name}.partial"
    if (partial / CHECKPOINT).is_file():
        return (f"{run} does not exist, but an unfinished run of it is at {partial}: finish it with "
                f"`mvsdi generate --resume {run}`")
    if run.exists():
        return f"{run} is a file, not an mvsdi run directory; give the folder `mvsdi generate` wrote (its --out)"
    return f"{run} does not exist; give the folder `mvsdi generate` wrote (its --out)"


def read_checkpoint(run: str | Path) -> dict[str, Any]:
    """The checkpoint of a run directory; a clear error if it is no run, has no checkpoint, or it cannot be read."""
    run = Path(run)
    problem = _not_a_run(run)
    if problem:
        raise RunDirectoryError(problem)
    path = run / CHECKPOINT
    if not path.is_file():
        raise RunDirectoryError(f"{run} has no {CHECKPOINT}: the run never reached its first checkpoint. "
                                "Run `mvsdi generate` again (or `--resume` an interrupted run that saved one).")
    try:
        # weights_only: a checkpoint is data and must not run code when it is read
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise RunDirectoryError(f"{path} cannot be read ({type(exc).__name__}: {exc}); "
                                "the file is damaged: rerun or resume from another copy") from exc


def read_json(path: Path, default: Any = None) -> Any:
    """The content of a JSON file; ``default`` when it is missing or unreadable, or when ``default``
    is a dict and the file holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
    return default if isinstance(default, dict) and not isinstance(data, dict) else data


def read_summary(run: str | Path) -> dict[str, Any]:
    """A run's summary.json ({} if it has none or it cannot be read); its "status" is "completed",
    "interrupted" or "diverged"."""
    return read_json(Path(run) / SUMMARY, {})


def load_trained_model(run: str | Path, device: torch.device | str = "cpu"):
    """(RunConfig, Model) of a run directory, the model in eval mode with the checkpoint's weights."""
    checkpoint = read_checkpoint(run)
    config = RunConfig.from_dict(checkpoint["config"])
    model = Model.create(config, torch.device(device))
    model.load_state_dict(checkpoint["model"])
    model.field.eval()
    return config, model
