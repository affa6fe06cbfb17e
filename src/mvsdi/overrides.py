"""Dotted overrides of a run's configuration: ``guidance.guidance_scale=50``, ``cameras.elevation_deg=-10,45``.

A path names nested dataclass fields of ``RunConfig``; the text value is parsed by the field's
declared type (int, float, bool, str, a Literal, an optional, a tuple), so a typo in a name or a
value is an error that lists what exists, and a rename in the config breaks here loudly, not silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_assignment(text: str) -> tuple[str, str]:
    """``"a.b=value"`` → (``"a.b"``, ``"value"``)."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"--set takes PATH=VALUE, e.g. guidance.guidance_scale=50; got {text!r}")
    return path.strip(), value.strip()


def _parse(kind: Any, text: str, path: str) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in {"none", "null", ""}:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse(option, text, path)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if text not in map(str, args):
            raise ValueError(f"{path} must be one of {', '.join(map(str, args))}, got {text!r}")
        return next(a for a in args if str(a) == text)
    if origin is tuple:
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        types_ = args if args[-1:] != (Ellipsis,) else (args[0],) * len(parts)
        if len(parts) != len(types_):
            raise ValueError(f"{path} takes {len(types_)} comma-separated values, got {text!r}")
        return tuple(_parse(t, p, path) for t, p in zip(types_, parts))
    if kind is bool:
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError(f"{path} is true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{path} takes {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None
    raise ValueError(f"{path} is a {kind!r}: set its fields one by one ({path}.FIELD=VALUE)")


def parse(kind: Any, text: str, path: str) -> Any:
    """``text`` as a value of the declared type ``kind`` (the one parser of settings and flags); an
    error names ``path``."""
    return text if kind is str or kind == "str" else _parse(kind, text, path)


def parse_fields(cls: type, texts: dict[str, str]) -> dict[str, Any]:
    """Top-level fields of the dataclass ``cls`` given as text, parsed by their declared types."""
    hints = get_type_hints(cls)
    unknown = [name for name in texts if name not in hints]
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}: {cls.__name__} has {', '.join(hints)}")
    return {name: parse(hints[name], text, name) for name, text in texts.items()}


def field_type(obj: Any, name: str, path: str, declared: Any = None) -> Any:
    """The declared type of ``obj.name``, or an error listing the fields that exist (and, where
    ``obj`` is one member of a union of dataclasses ``declared``, which member has ``name``)."""
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        owners = [m.__name__ for m in get_args(declared) if dataclasses.is_dataclass(m)
                  and name in {f.name for f in dataclasses.fields(m)}]
        if owners:
            raise ValueError(f"{path} is a setting of {' and '.join(owners)} only, and this config's "
                             f"{path.rpartition('.')[0]} is {type(obj).__name__}: drop it, or start from a "
                             f"preset with that kind")
        raise ValueError(f"unknown setting {path!r}: {type(obj).__name__} has {', '.join(names)}")
    return get_type_hints(type(obj))[name]


def apply(obj: Any, path: str, value: Any) -> Any:
    """A copy of the dataclass ``obj`` with the field at dotted ``path`` set to ``value`` (text is parsed)."""
    return apply_all(obj, {path: value})


def apply_all(obj: Any, assignments: dict[str, Any], prefix: str = "", declared: Any = None) -> Any:
    """A copy of the dataclass ``obj`` with every dotted path set, each dataclass rebuilt once with
    all its changes: settings valid together (K=3 with a budget of 9) never meet the validation half
    applied."""
    values: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for path, value in assignments.items():
        head, _, rest = path.partition(".")
        if rest:
            groups.setdefault(head, {})[rest] = value
        else:
            values[head] = value
    changes = {}
    for head, value in values.items():
        full = f"{prefix}{head}"
        kind = field_type(obj, head, full, declared)
        if head in groups:
            raise ValueError(f"{full} is set both whole and field by field: set its fields one by one")
        changes[head] = parse(kind, value, full) if isinstance(value, str) else value
    for head, sub in groups.items():
        full = f"{prefix}{head}"
        kind = field_type(obj, head, full, declared)
        current = getattr(obj, head)
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{full} is a value, not a group: use {full}=VALUE")
        changes[head] = apply_all(current, sub, f"{full}.", kind)
    return dataclasses.replace(obj, **changes)
