"""One place that names each setting: its default, range, choices and help text.

Configuration dataclasses declare their fields with :func:`param`; the metadata drives
validation (:func:`check`, called from each dataclass's ``__post_init__``), the command-line
options (:func:`add_arguments` / :func:`from_args`) and the widget forms
(:func:`widget_options` for magicgui), so a range or a help text is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting outside its documented range; the message names the setting and the range."""


@dataclass(frozen=True)
class Spec:
    """What a setting accepts and how it is explained."""

    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False  # ``min`` itself is not allowed (e.g. an IoU in (0, 1])
    choices: tuple[Any, ...] | None = None
    multiple_of: int | None = None
    optional: bool = False  # None is allowed (means "not set" / "automatic")
    label: str | None = None  # short name for forms; default: the field name in words
    advanced: bool = False  # hidden behind "advanced" in forms
    kind: type | None = None  # the value type where the default (None) does not say it

    def describe(self) -> str:
        """The accepted values in words, for error messages and help."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.min is not None and self.max is not None:
            lo = "(" if self.min_exclusive else "["
            parts.append(f"in {lo}{self.min:g}, {self.max:g}]")
        elif self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        elif self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        return " and ".join(parts) or "any value"


def param(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = None,
          **spec: Any) -> Any:
    """A dataclass field carrying a :class:`Spec` (keyword arguments as in Spec)."""
    meta = {"spec": Spec(help=help, **spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def specs(cls_or_obj: Any) -> dict[str, Spec]:
    """Field name -> Spec for every field declared with :func:`param`."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls_or_obj)
            if "spec" in f.metadata}


def check_value(owner: str, name: str, value: Any, spec: Spec) -> None:
    """Raise ConfigError when ``value`` is outside what ``spec`` accepts."""
    if value is None:
        if spec.optional:
            return
        raise ConfigError(f"{owner}.{name} must be set ({spec.describe()})")
    bad = False
    if spec.choices is not None:
        bad = value not in spec.choices
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            bad = True
        if spec.min is not None:
            bad |= value <= spec.min if spec.min_exclusive else value < spec.min
        if spec.max is not None:
            bad |= value > spec.max
        if spec.multiple_of:
            bad |= value % spec.multiple_of != 0
    if bad:
        raise ConfigError(f"{owner}.{name} = {value!r} is not allowed: it must be "
                          f"{spec.describe()} ({spec.help})")


def check(obj: Any) -> None:
    """Validate every :func:`param` field of a dataclass instance."""
    owner = type(obj).__name__
    for name, spec in specs(obj).items():
        check_value(owner, name, getattr(obj, name), spec)


def _flag(name: str, prefix: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  prefix: str = "", only: Iterable[str] | None = None,
                  exclude: Sequence[str] = (), aliases: dict[str, Sequence[str]] | None = None,
                  unset_default: bool = False) -> None:
    """Add one ``--option`` per :func:`param` field of ``cls`` (defaults from the class).

    ``aliases`` adds other spellings of a field's option (e.g. ``{"batch_size": ["--batch"]}``
    keeps a short historical name). ``unset_default`` leaves options the user did not give out
    of the namespace, so :func:`from_args` lets the class (or a factory such as
    ``train.train_config``) pick the default.
    """
    defaults = cls()
    wanted = set(only) if only is not None else None
    aliases = aliases or {}
    for name, spec in specs(cls).items():
        if name in exclude or (wanted is not None and name not in wanted):
            continue
        default = getattr(defaults, name)
        rule = "" if spec.describe() == "any value" else f"{spec.describe()}; "
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS if unset_default else default, "dest": prefix + name,
            "help": f"{spec.help} ({rule}default {default})".replace("%", "%%")}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if spec.choices is not None:
                kwargs["choices"] = list(spec.choices)
            elif isinstance(default, int | float) or spec.kind in (int, float):
                kind = spec.kind or type(default)
                kwargs["type"] = _number(kind, f"{cls.__name__}.{name}")
            kwargs["metavar"] = name.upper()
        parser.add_argument(_flag(name, prefix), *aliases.get(name, ()), **kwargs)


def _number(kind: type, what: str) -> Any:
    """argparse type for an int/float option whose error names the setting."""

    def convert(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'} ({what})"
            ) from None

    convert.__name__ = kind.__name__
    return convert


def check_multiple(owner: str, name: str, value: int, divisor: int, why: str) -> None:
    """Raise ConfigError unless ``value`` is a multiple of ``divisor`` (a model's constraint)."""
    if value % divisor:
        lower = max(divisor, value // divisor * divisor)
        raise ConfigError(
            f"{owner}.{name} = {value} is not allowed: {why} needs a multiple of {divisor} "
            f"(e.g. {lower} or {lower + divisor})")


def from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> Any:
    """Build ``cls`` from options added by :func:`add_arguments` (and ``overrides``)."""
    values = {name: getattr(args, prefix + name) for name in specs(cls)
              if hasattr(args, prefix + name)}
    return cls(**(values | overrides))


def widget_options(cls: type, name: str) -> dict[str, Any]:
    """magicgui widget options (label, tooltip, min/max/step or choices) for one field."""
    spec = specs(cls)[name]
    opts: dict[str, Any] = {"label": spec.label or name.replace("_", " "), "tooltip": spec.help}
    if spec.choices is not None:
        opts["choices"] = list(spec.choices)
        return opts
    if spec.min is not None:
        lo = spec.min
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        integer = spec.kind is int or (isinstance(default, int) and not isinstance(default, bool))
        if spec.min_exclusive and (spec.multiple_of or integer):
            # Integers: the next allowed value. Floats keep the bound itself (any step above
            # it could exceed a small default such as a learning rate); check() refuses it.
            lo = spec.multiple_of or lo + 1
        opts["min"] = lo
    if spec.max is not None:
        opts["max"] = spec.max
    if spec.multiple_of:
        opts["step"] = spec.multiple_of
    return opts
