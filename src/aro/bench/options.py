"""A subcommand's options, declared once as the fields of a frozen dataclass.

Each field carries its default and, through :func:`option`, its help text, any alias flags and
the values it accepts. :func:`add_options` generates one ``--flag`` per field (``max_step`` ->
``--max-step``) whose parsed default is the field's default: tuple fields are written
comma-separated and parsed back into tuples, so the command line and the dataclass cannot
disagree. :func:`options_from_args` builds the dataclass from the parsed namespace; its
``__post_init__`` (calling :func:`check_options` for the declared bounds and choices) rejects bad
values with a ``ValueError`` that names the flag and the fix.

``aro bench``'s :class:`aro.bench.config.BenchConfig` (presets, JSON files) keeps its own
generator in :mod:`aro.bench.config`, which shares :func:`converter` with this one.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from dataclasses import field, fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["add_options", "check_options", "converter", "flag", "option", "options_from_args"]

T = TypeVar("T")


def option(default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: Iterable[Any] | None = None,
           minimum: float | None = None) -> Any:
    """A dataclass field with its default, its ``--help`` line, former spellings of its flag
    (``aliases``), the values it (or, for a tuple, each item) may take and its smallest value."""
    metadata = {"help": help, "aliases": tuple(aliases), "choices": None if choices is None else tuple(choices),
                "minimum": minimum}
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The flag of field ``name``: ``train_model`` -> ``--train-model``."""
    return "--" + name.replace("_", "-")


def converter(tp: Any):
    """The function that turns a flag's text into a value of type ``tp``: comma-separated items
    for a tuple (blank items dropped, so ``''`` is the empty tuple), ``none`` for an optional's
    None, the type itself otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        inner = args[0]

        def items(s: str) -> tuple:
            return tuple(inner(x.strip()) for x in s.split(",") if x.strip())

        items.__name__ = f"comma-separated {inner.__name__}"  # argparse's "invalid ... value" names it
        return items
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))

        def optional(s: str) -> Any:
            return None if s.lower() == "none" else inner(s)

        optional.__name__ = inner.__name__
        return optional
    return tp


def _shown(value: Any) -> Any:
    """A default as it is written on the command line (argparse parses a string default with the
    flag's type, so the parsed default is the field's default again)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value) if isinstance(value, Path) else value


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` (and its aliases) per field of the dataclass ``cls``; a bool field that
    defaults to False is a switch. Use with ``argparse.ArgumentDefaultsHelpFormatter`` to show
    the defaults."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        names = (flag(f.name), *meta.get("aliases", ()))
        help_text = meta["help"].replace("%", "%%")
        if hints[f.name] is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        choices = meta.get("choices")
        scalar = typing.get_origin(hints[f.name]) is not tuple
        parser.add_argument(*names, dest=f.name, type=converter(hints[f.name]), default=_shown(f.default),
                            choices=choices if scalar else None, help=help_text)


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass ``cls`` from a namespace parsed by a parser given :func:`add_options`."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_options(options: Any) -> None:
    """Normalise and check a dataclass made of :func:`option` fields, for its ``__post_init__``:
    lists become tuples and strings become paths where the field says so; a value outside its
    declared choices or below its minimum raises ``ValueError`` naming the flag."""
    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        value = getattr(options, f.name)
        if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
            value = tuple(value)
        elif hints[f.name] is Path and isinstance(value, str):
            value = Path(value)
        object.__setattr__(options, f.name, value)  # frozen: the one normalisation, before any use
        items = value if isinstance(value, tuple) else (value,)
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices is not None:
            unknown = [v for v in items if v not in choices]
            if unknown:
                raise ValueError(f"{flag(f.name)}: unknown {_shown(tuple(unknown))}; "
                                 f"choose from {', '.join(map(str, choices))}")
        if minimum is not None:
            if any(v < minimum for v in items):
                which = "every value" if isinstance(value, tuple) else "it"
                raise ValueError(f"{flag(f.name)} {_shown(value)}: {which} must be >= {minimum:g}")

