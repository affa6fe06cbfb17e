"""List-valued command-line options shared by the subcommands (`bench`, `testbed`)."""

from __future__ import annotations


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated option as its non-empty, stripped parts."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds`` of both `bench` and `testbed`: a comma-separated list of distinct integers ("3" is seed 3)."""
    try:
        seeds = tuple(int(s) for s in parse_names(text))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed and each once, e.g. 0,1,2")
    return seeds
