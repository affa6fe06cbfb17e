"""`mvsdi testbed`: the K-view study on the weights-free ground truth."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
from pathlib import Path

from mvsdi.arguments import parse_names, parse_seeds
from mvsdi.atomic_files import TEMPORARY_FILES
from mvsdi.commands import run_command
from mvsdi.priors.loading import resolve_device
from mvsdi.rundir import RENDERS, RunDirectory, RunDirectoryError
from mvsdi.testbed.scenes import SCENES, get_scene
from mvsdi.testbed.settings import METHODS_BY_NAME, SETTINGS, SMALL, StudySettings, check_settings
from mvsdi.testbed.study import run_study

# What a study writes (see mvsdi.testbed.study), and the temporary files of its atomic writes: a
# folder holding anything else is not a study, and --overwrite must not delete it.
STUDY_FILES = ("results.jsonl", "variance.json", "table.md", "table.csv", "study.json", "log.jsonl", "*.png",
               "turntable_*.gif", TEMPORARY_FILES)


# `mvsdi testbed --help`'s account of the command (argparse joins the lines)
DESCRIPTION = """Distil procedural scenes with the exact ideal denoiser of their renders as the prior, for K=1
and K>1 methods at the same budget, and measure the result against the true shapes, with paired
differences against K=1 and a verdict per method and metric. Settings: small (the default, minutes
on 2 CPU cores), medium (the study with power, about an hour on 2 cores), budgets (quality against
budget for K=1, 2, 4), full (a GPU)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "testbed", help="compare K-view methods at equal budget where the truth is known (no weights)",
        description=DESCRIPTION,
        epilog="settings: " + "; ".join(f"{name}: {_described(s)}" for name, s in SETTINGS.items())
               + ". methods: " + ", ".join(METHODS_BY_NAME)
               + ". scenes: " + "; ".join(f"{name} ({scene.description})" for name, scene in SCENES.items()))
    p.add_argument("--setting", choices=tuple(SETTINGS), default="small",
                   help="the study's setting (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="the same as --setting full")
    p.add_argument("--scenes", help=f"comma-separated scene names, from: {', '.join(SCENES)} "
                   f"(default: the setting's, small: {_listed(SMALL.scenes)})")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the setting's). A list, as in "
                   "`mvsdi bench`: --seeds 3 is the one seed 3")
    p.add_argument("--budget", help="guidance evaluations per cell, or a comma-separated list of budgets (each a "
                   "multiple of every method's K)")
    p.add_argument("--methods", help=f"comma-separated, K1 first, from: {', '.join(METHODS_BY_NAME)}")
    p.add_argument("--guidance", help="comma-separated: sds,sdi")
    p.add_argument("--variance-repeats", type=int, help="gradient draws per method and point of the run (R, >= 2; "
                   "the ratios' 95%% intervals need R >= 3; 0: no variance)")
    p.add_argument("--device", help="cpu, cuda, auto")
    p.add_argument("--workers", type=int, help="processes that run cells side by side (default: one per CPU core "
                   "on the CPU; on a GPU, as many as its free memory holds, at most one per core and 16); the "
                   "results do not depend on it")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="wall-clock limit of the study: cells run in blocks of one scene and seed (every method and "
                   "guidance), scenes first, and a block starts only when the cost measured so far says it ends in "
                   "time; a study cut by the limit writes the tables of its complete blocks and exits 0 "
                   "(default: none; --full: 8; 0: none)")
    p.add_argument("--out", type=Path, default=Path("runs/testbed"),
                   help="the study folder: tables, plots and GIFs (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier study at --out, whole, once the new one completes")
    p.add_argument("--no-progress", action="store_true",
                   help="print no progress lines (they still go to the study's log.jsonl)")
    return p


def _listed(values) -> str:
    return ",".join(str(v) for v in values)


def _described(settings) -> str:
    return (f"{len(settings.scenes)} scene(s) × seeds {_listed(settings.seeds)}, budget {_listed(settings.budgets)}, "
            f"{settings.image_size}², {settings.device}")


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    if args.full and args.setting not in ("small", "full"):  # small is --setting's default
        raise ValueError(f"--full is --setting full; it cannot be combined with --setting {args.setting}")
    settings = SETTINGS["full" if args.full else args.setting]
    changes = {}
    if args.scenes:
        changes["scenes"] = parse_names(args.scenes)
        for name in changes["scenes"]:
            get_scene(name)
    if args.seeds is not None:
        changes["seeds"] = parse_seeds(args.seeds)
    if args.budget is not None:
        try:
            changes["budgets"] = tuple(int(b) for b in parse_names(args.budget))
        except ValueError:
            raise ValueError(f"--budget {args.budget!r}: give a number of guidance evaluations, or several "
                             "separated by commas") from None
    if args.methods:
        changes["methods"] = parse_names(args.methods)
    if args.guidance:
        changes["guidances"] = parse_names(args.guidance)
        unknown = set(changes["guidances"]) - {"sds", "sdi"}
        if unknown:
            raise ValueError(f"unknown guidance {sorted(unknown)}; choose from sds, sdi")
    if args.variance_repeats is not None:
        changes["variance_repeats"] = args.variance_repeats
    if args.device:
        changes["device"] = args.device
    if args.time_limit is not None:
        if not args.time_limit >= 0:
            raise ValueError(f"--time-limit {args.time_limit:g}: give minutes, at least 0 (0: no limit)")
        changes["time_limit_minutes"] = args.time_limit or None
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1")
    return dataclasses.replace(settings, **changes)


def foreign_files(folder: Path) -> list[str]:
    """Names in ``folder`` that a study does not write (subfolders included)."""
    if not folder.is_dir():
        return []
    return sorted(p.name + "/" * p.is_dir() for p in folder.iterdir()
                  if p.is_dir() or not any(fnmatch.fnmatch(p.name, pattern) for pattern in STUDY_FILES))


def open_study_folder(out: Path, overwrite: bool) -> RunDirectory:
    """A ``RunDirectory`` for the study: written in a staging folder beside ``out``, moved into place
    whole on ``commit``, so an earlier study is replaced, never mixed with the new one's files."""
    if overwrite and (foreign := foreign_files(out)):
        raise RunDirectoryError(
            f"--out {out} holds files that a study does not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}), so --overwrite does not replace it; nothing was changed. "
            "Choose another --out, or move those files away.")
    return RunDirectory(out, overwrite=overwrite)


def _study(args: argparse.Namespace, said: dict[str, str]):
    """Validate everything, then run the study in its staging folder and move it into place.

    A study that Ctrl-C stopped after some blocks had completed (``run_study`` wrote their tables)
    is moved into place too, unless ``args.out`` holds an earlier study, which a partial one must
    not replace: it then stays in the staging folder. Either way ``said["interrupted"]`` says where
    it is, and the command exits as interrupted."""
    settings = settings_from_args(args)
    check_settings(settings)
    resolve_device(settings.device)  # e.g. --device cuda without a GPU: before any folder is made
    folder = open_study_folder(args.out, args.overwrite)
    try:
        result = run_study(settings, folder.path, progress=not args.no_progress, log=folder.log,
                           workers=args.workers)
        with contextlib.suppress(OSError):  # a run directory's (empty) renders folder; a study has none
            (folder.path / RENDERS).rmdir()
    except BaseException:
        folder.discard()  # the staging folder only: an earlier study at --out is untouched
        raise
    blocks = result.get("blocks", {})
    if not blocks.get("interrupted"):
        folder.commit()
        return result
    done = f"interrupted after {blocks['ran']} of {blocks['of']} blocks (scene × seed)"
    if args.out.is_dir() and any(args.out.iterdir()):
        folder.close()
        said["interrupted"] = (f"{done}: their results and tables are in {folder.path}; {args.out} was left as it "
                               "was. The next study at this --out replaces that folder: move it away to keep it.")
    else:
        folder.commit()
        said["interrupted"] = f"{done}: their results, tables and turntables are in {args.out}"
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    said = {"interrupted": f"interrupted; {args.out} was left as it was (the partial study is discarded)"}

    def study_and_say() -> int:
        result = _study(args, said)
        print((args.out / "table.md").read_text())
        print(f"study written to {args.out} in {result['seconds']:.0f} s")
        blocks = result.get("blocks", {})
        if blocks.get("stopped_by_time_limit"):
            print(f"the time limit stopped the study after {blocks['ran']} of {blocks['of']} blocks (scene × seed); "
                  "its tables and verdicts are over those blocks. A larger --time-limit runs more of them.")
        return 0

    return run_command(study_and_say, name="mvsdi testbed", interrupted=lambda: said["interrupted"])
