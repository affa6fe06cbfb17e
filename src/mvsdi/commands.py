"""What every ``mvsdi`` subcommand does with a failure: bad input → a one-line message and exit 2,
Ctrl-C → a line saying what was kept and exit 130; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable

from mvsdi.rundir import RunDirectoryError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C

# Errors that mean the user's input cannot be used, whatever the command: a bad value, a path that
# cannot be read or written, a folder that is no run. Commands add their own (e.g. weights that
# cannot be loaded); their classes live in packages this module must not import.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RunDirectoryError)


def run_command(work: Callable[[], int], *, name: str = "mvsdi",
                input_errors: tuple[type[BaseException], ...] = (),
                interrupted: str | Callable[[], str] = "interrupted") -> int:
    """``work()``'s exit code, or: ``EXIT_BAD_INPUT`` after printing "NAME: error: ..." for an error
    of ``INPUT_ERRORS`` or ``input_errors``; ``EXIT_INTERRUPTED`` after printing "NAME: " and
    ``interrupted`` (a callable: asked only then, so it can say what the work had reached)."""
    try:
        return work()
    except (*INPUT_ERRORS, *input_errors) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{name}: {interrupted() if callable(interrupted) else interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
