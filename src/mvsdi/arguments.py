"""Command-line options shared by the subcommands: lists (`bench`, `testbed`), and a config's
knobs as options (`generate`, `bench`).

A knob's options are generated from its declaration (``mvsdi.knobs``): every leaf of the config
answers to ``--`` + its dotted path in config.json (``--guidance.guidance_scale 50``, the same as
``--set guidance.guidance_scale=50``) and to the short flags it declares (``--guidance-scale``); a
tuple takes its values space-separated (``--cameras.elevation_deg -10 45``), a bool alone is true
(``--field.compiled``) or takes true/false. Values stay text until ``mvsdi.overrides`` parses them
by the field's declared type, so a flag and ``--set`` are parsed by one parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, Sequence, get_args, get_origin

from mvsdi.knobs import Leaf, knob_of, leaves

KNOB = "knob:"  # the namespace prefix of a knob option's dest (no clash with the commands' own options)


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


# ---------------------------------------------------------------------------------------------
# a config's knobs as command-line options

def knob_flags(leaf: Leaf) -> list[str]:
    """A knob's flags: those it declares (``--views``, ``-k``), then ``--`` + its dotted path in
    config.json (``--guidance.delta_max``), which every knob has."""
    return list(dict.fromkeys((*leaf.flags, f"--{leaf.path}")))


def add_knob_options(parser: argparse._ActionsContainer, config_class: type, *, paths: Sequence[str] | None = None,
                     defaults: Any = None, skip: Sequence[str] = ()) -> list[Leaf]:
    """Adds an option for each leaf of ``config_class`` (those at ``paths`` if given, else all but
    ``skip``), grouped by top-level section. Values are kept as text (their dest is ``KNOB + path``),
    to be parsed by the field's declared type with the ``--set`` settings (``knob_settings``).
    ``defaults``: a config whose values the help notes as defaults."""
    chosen = [leaf for leaf in leaves(config_class) if (leaf.path in paths if paths is not None
                                                         else leaf.path not in skip)]
    missing = set(paths or ()) - {leaf.path for leaf in chosen}
    if missing:
        raise ValueError(f"no knob {', '.join(sorted(missing))} in {config_class.__name__}")
    sections: dict[str, argparse._ActionsContainer] = {}
    for leaf in chosen:
        head, dot, _ = leaf.path.partition(".")
        if dot and head not in sections:
            section = dataclasses.fields(config_class)[[f.name for f in dataclasses.fields(config_class)].index(head)]
            sections[head] = parser.add_argument_group(f"{head}.*", _escape(knob_of(section).help))
        _add_option(sections.get(head, parser) if dot else parser, leaf, defaults)
    return chosen


def _add_option(parser: argparse._ActionsContainer, leaf: Leaf, defaults: Any) -> None:
    dest, flags = KNOB + leaf.path, knob_flags(leaf)
    negations = [flag for flag in flags if flag.startswith("--no-") and leaf.kind is bool]
    help_text = _escape(_help(leaf, defaults))
    options: dict[str, Any] = {"dest": dest, "help": help_text, "metavar": _metavar(leaf)}
    if leaf.kind is bool:  # --flag alone is true; --flag false also works, as in --set
        options.update(nargs="?", const="true", metavar="BOOL")
    elif get_origin(leaf.kind) is tuple:
        options["nargs"] = "+" if get_args(leaf.kind)[-1:] == (Ellipsis,) else len(get_args(leaf.kind))
    parser.add_argument(*[f for f in flags if f not in negations], **options)
    for flag in negations:
        parser.add_argument(flag, dest=dest, action="store_const", const="false", help=f"same as {flags[-1]} false")


def _metavar(leaf: Leaf) -> Any:
    if leaf.knob.metavar:
        return leaf.knob.metavar
    kind = leaf.kind
    if get_origin(kind) is Literal:
        return "{" + ",".join(map(str, get_args(kind))) + "}"
    if get_origin(kind) is tuple:
        parts = get_args(kind)
        return tuple(getattr(p, "__name__", "X").upper() for p in parts) if Ellipsis not in parts else "VALUE"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(kind, "VALUE")


def _help(leaf: Leaf, defaults: Any) -> str:
    text = f"{leaf.group_help}: {leaf.knob.help}" if leaf.path.count(".") >= 2 and leaf.group_help else leaf.knob.help
    if leaf.only:
        text += f" ({' and '.join(_kind_name(owner) for owner in leaf.only)} only)"
    default = _default_text(leaf, defaults)
    return f"{text} ({default})" if default else text


def _default_text(leaf: Leaf, defaults: Any) -> str:
    if defaults is None:
        return ""
    if len(leaf.defaults) > 1 or leaf.only:  # in a union: each member's default
        values = {repr(value) for _, value in leaf.defaults}
        if len(values) > 1:
            return "default " + ", ".join(f"{_kind_name(owner)} {_show(value)}" for owner, value in leaf.defaults)
        return f"default {_show(leaf.defaults[0][1])}"
    value = defaults
    for part in leaf.path.split("."):
        value = getattr(value, part)
    return f"default {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "empty" if value == "" else str(value)


def _kind_name(owner: type) -> str:
    return owner.__name__.removesuffix("Config").upper()


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def knob_settings(args: argparse.Namespace, chosen: Sequence[Leaf]) -> dict[str, str]:
    """The knobs given on the command line, as text by dotted path (a tuple's values joined by commas,
    as ``--set`` writes them)."""
    settings = {}
    for leaf in chosen:
        value = getattr(args, KNOB + leaf.path, None)
        if value is not None:
            settings[leaf.path] = ",".join(value) if isinstance(value, list) else value
    return settings
