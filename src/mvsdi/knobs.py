"""A knob of a run's configuration, declared once on its dataclass field: default, help, flags.

``knob(default, help, ...)`` is ``dataclasses.field`` with a ``Knob`` in its metadata, and
``leaves(cls)`` walks a config dataclass (through nested dataclasses and unions of them) down to
the values a user sets. The command line of ``mvsdi generate`` and ``mvsdi bench``, the dotted
overrides and the resume rules all read these declarations, so a renamed or added field reaches
all of them. A leaf module: it imports nothing of mvsdi, so every config module can use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, get_args, get_origin, get_type_hints

_METADATA_KEY = "mvsdi.knob"


@dataclasses.dataclass(frozen=True)
class Knob:
    help: str
    # extra command-line flags of a value (it always answers to --its.dotted.path too)
    flags: tuple[str, ...] = ()
    # on a field holding a dataclass: extra flags of its parts, e.g. {"end": ("--tv-weight",)}
    part_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # says how a run executes, not what it computes: a resume may change it
    execution: bool = False
    # False: not part of the method a preset names (the prompt, seed, model, sizes, execution)
    method: bool = True
    metavar: tuple[str, ...] | None = None


def knob(default: Any = dataclasses.MISSING, help: str = "", *,
         flags: tuple[str, ...] | Mapping[str, tuple[str, ...]] = (), execution: bool = False, method: bool = True,
         metavar: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field declared as a knob; ``flags`` is a tuple for a value, or a mapping from a
    part's name to its flags for a field that holds a dataclass."""
    if not help.strip():
        raise ValueError("a knob needs a help text: say what the value does")
    own, parts = ((), tuple(flags.items())) if isinstance(flags, Mapping) else (tuple(flags), ())
    declared = Knob(help, own, parts, execution, method and not execution, metavar)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_METADATA_KEY: declared})


def knob_of(field: dataclasses.Field) -> Knob:
    if _METADATA_KEY not in field.metadata:
        raise TypeError(f"config field {field.name!r} is not declared with mvsdi.knobs.knob")
    return field.metadata[_METADATA_KEY]


def members(kind: Any) -> tuple[type, ...]:
    """The dataclasses a declared type stands for: itself, or each member of a union of them; ()
    for a value (a number, text, tuple, optional...)."""
    if dataclasses.is_dataclass(kind):
        return (kind,)
    if get_origin(kind) in (typing.Union, types.UnionType):
        options = get_args(kind)
        if all(dataclasses.is_dataclass(option) for option in options):
            return options
    return ()


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A value of the config tree, by its dotted path."""

    path: str
    kind: Any  # the declared type (a union's members declaring the same Literal field: the Literal of all)
    knob: Knob
    flags: tuple[str, ...]  # its own extra flags and those its group declares for it
    group_help: str  # the help of the field holding its dataclass ("" at the top)
    only: tuple[type, ...] = ()  # in a union, the members that have it (): all of them
    defaults: tuple[tuple[type, Any], ...] = ()  # each declaring class → its default


def leaves(cls: Any, prefix: str = "", group: Knob | None = None) -> list[Leaf]:
    """Every leaf under ``cls`` (a dataclass or a union of them), in declaration order."""
    options = members(cls)
    found: dict[str, Leaf] = {}
    for owner in options:
        hints = get_type_hints(owner)
        for field in dataclasses.fields(owner):
            for leaf in _leaves_of(owner, field, hints[field.name], prefix, group):
                found[leaf.path] = _merge(found[leaf.path], leaf) if leaf.path in found else leaf
    if len(options) > 1:
        found = {path: _only(leaf, options) for path, leaf in found.items()}
    return list(found.values())


def _leaves_of(owner: type, field: dataclasses.Field, kind: Any, prefix: str, group: Knob | None) -> list[Leaf]:
    declared = knob_of(field)
    path = prefix + field.name
    if members(kind):
        return leaves(kind, path + ".", declared)
    extra = dict(group.part_flags).get(field.name, ()) if group else ()
    default = field.default if field.default is not dataclasses.MISSING else None
    return [Leaf(path, kind, declared, declared.flags + tuple(extra), group.help if group else "",
                 defaults=((owner, default),))]


def _merge(first: Leaf, other: Leaf) -> Leaf:
    """One leaf for a field that two members of a union declare (e.g. each guidance's scale)."""
    kind = first.kind
    if get_origin(first.kind) is Literal and get_origin(other.kind) is Literal:
        kind = Literal[tuple(dict.fromkeys(get_args(first.kind) + get_args(other.kind)))]
    flags = tuple(dict.fromkeys(first.flags + other.flags))
    return dataclasses.replace(first, kind=kind, flags=flags, defaults=first.defaults + other.defaults)


def _only(leaf: Leaf, options: tuple[type, ...]) -> Leaf:
    owners = tuple(owner for owner, _ in leaf.defaults)
    return leaf if set(owners) == set(options) else dataclasses.replace(leaf, only=owners)


def names(cls: type, *, execution: bool | None = None, method: bool | None = None) -> tuple[str, ...]:
    """The names of ``cls``'s own fields whose knobs are (or are not) execution settings / method."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if (execution is None or knob_of(f).execution == execution)
                 and (method is None or knob_of(f).method == method))
