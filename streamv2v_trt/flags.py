"""Command-line flags that come from config fields: each field a command exposes carries its flag and help in its
dataclass metadata, written once beside the field and its default.

    height: int = field(default=512, metadata=flag("frame height in pixels, a multiple of 8", default_text=...))

`add_flags` adds a dataclass's flags to a parser (type, choices and the "(default: ...)" of --help from the field),
`values` reads them back by field name, and `argv` writes an instance back as flags (what `EngineSpec.build_command`
prints), so a parser, a rebuild command and a default never disagree with the config class. Plain: no model or
runtime library is imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "flag"


@dataclass(frozen=True)
class Flag:
    help: str
    names: tuple[str, ...] = ()  # option strings; default: the field's name in kebab case, --ff-threshold
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # text -> value; default: the type of the field's default (or str)
    show: Callable[[Any], str] | None = None  # value -> text (argv); default: an enum's value, repr of a float
    choices: tuple[str, ...] | None = None  # default: an enum's values
    default_text: str | None = None  # what --help names as the default when the field's own default is not it
    repeat: bool = False  # one flag per element of a tuple: --lora A --lora B
    switch: bool = False  # a bool with --x / --no-x (else a bool is an on-switch, --x)


def flag(help: str, **options) -> dict[str, Flag]:
    """The `metadata=` of a dataclass field that has a command-line flag."""
    return {METADATA_KEY: Flag(help, **options)}


def flagged(cls, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """`cls`'s fields with a flag, in field order (only `names`, when given; each must have one)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if METADATA_KEY in f.metadata}
    if names is None:
        return list(fields.values())
    missing = [n for n in names if n not in fields]
    if missing:
        raise KeyError(f"{cls.__name__} fields {missing} have no flag")
    return [fields[n] for n in names]


def option(cls, name: str) -> str:
    """The flag of field `name`: "--ff-layers" for `EngineSpec.ff_layer_prefixes`."""
    (f,) = flagged(cls, [name])
    return _names(f)[0]


def field_default(cls, name: str) -> Any:
    """The default of `cls`'s field `name` (where a runtime default is read from the config class)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_flags(
    parser,
    cls,
    names: Iterable[str] | None = None,
    *,
    unset: Iterable[str] = (),
    unset_text: str = "",
    defaults: dict[str, Any] | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add the flags of `cls`'s fields `names` (default: every flagged field) to `parser` (or an argument group).

    The parser's default is `defaults[name]` (this command's) or the field's; --help names it (or the flag's
    `default_text`). Fields in `unset` default to None (a value resolved later: the preset's, a build folder's, one
    that depends on other flags): --help names the default all the same, plus `unset_text` (", or the build
    folder's"). `aliases`: more option strings of a field for this command."""
    unset, defaults, aliases = set(unset), defaults or {}, aliases or {}
    for f in flagged(cls, names):
        meta: Flag = f.metadata[METADATA_KEY]
        base = field_default(cls, f.name)  # its type says what kind of flag it is
        own = defaults.get(f.name, base)
        boolean = isinstance(base, bool)
        on_switch = boolean and not meta.switch and own is False  # --x: off unless given, nothing to say
        if f.name in defaults:  # this command's own default
            shown = _shown(own)
        else:
            shown = meta.default_text or (None if on_switch else _shown(own))
        kwargs: dict[str, Any] = {"dest": _dest(f), "default": None if f.name in unset else own}
        if f.name in unset and shown is not None:
            shown += unset_text
        if boolean:
            kwargs["action"] = argparse.BooleanOptionalAction if meta.switch else "store_true"
        else:
            kwargs.update(metavar=meta.metavar, type=_told(meta.parse) if meta.parse else _parser(base))
            kwargs["choices"] = meta.choices or (
                tuple(e.value for e in type(base)) if isinstance(base, enum.Enum) else None
            )
        if meta.repeat:
            kwargs.update(action="append", default=[])
        text = meta.help if shown is None or "default" in meta.help else f"{meta.help} (default: {shown})"
        parser.add_argument(*_names(f), *aliases.get(f.name, ()), help=text.replace("%", "%%"), **kwargs)


def values(args: argparse.Namespace, cls, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The flags' values by field name (None: not given, for the `unset` fields); repeated flags as a tuple."""
    out = {}
    for f in flagged(cls, names):
        value = getattr(args, _dest(f))
        out[f.name] = tuple(value) if f.metadata[METADATA_KEY].repeat else value
    return out


def argv(obj, reference, names: Iterable[str] | None = None, always: Iterable[str] = ()) -> list[str]:
    """`obj`'s flags for the fields that differ from `reference`'s (and those in `always`): parsing them with a
    parser from `add_flags` over `reference`'s defaults gives `obj` back."""
    always, out = set(always), []
    cls = type(obj)
    for f in flagged(cls, names):
        meta: Flag = f.metadata[METADATA_KEY]
        value = getattr(obj, f.name)
        if f.name not in always and value == getattr(reference, f.name):
            continue
        name, show = _names(f)[0], meta.show or _text
        if meta.repeat:
            out += [text for item in value for text in (name, show(item))]
        elif isinstance(value, bool):
            out += [name] if value else [f"--no-{name[2:]}"] if meta.switch else []
        else:
            out += [name, show(value)]
    return out


def _names(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata[METADATA_KEY].names or ("--" + f.name.replace("_", "-"),)


def _dest(f: dataclasses.Field) -> str:
    return _names(f)[0].removeprefix("--").replace("-", "_")


def _told(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` whose ValueError argparse prints as it is (it prints only "invalid value" for a plain ValueError)."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return typed


def _parser(default: Any) -> Callable[[str], Any] | None:
    if isinstance(default, enum.Enum):
        return None  # the choices are the values; the config class turns the text into its enum
    return type(default) if isinstance(default, (int, float)) else None


def _text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    return repr(value) if isinstance(value, float) else str(value)


def _shown(value: Any) -> str | None:
    if value is None or value == [] or value == ():
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return _text(value) if not isinstance(value, float) else f"{value:g}"
