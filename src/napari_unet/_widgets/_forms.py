"""Parameter forms generated with magicgui from the engine's configuration dataclasses.

Labels, tooltips, ranges and steps come from ``params.widget_options`` (the one place that
names each setting for the CLI and the widgets); a form only says which fields it shows up
front and which go under "Advanced".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from magicgui.widgets import Container, create_widget
from qtpy.QtWidgets import QWidget

from .. import params

BIG = 1_000_000_000  # magicgui's default spin-box maximum is 999: lift it where none is set


def _options(cls: type, name: str, default: Any) -> dict[str, Any]:
    opts = params.widget_options(cls, name)
    spec = params.specs(cls)[name]
    if isinstance(default, bool) or "choices" in opts:
        return opts
    if isinstance(default, float):
        # A step one decade below the default also gives the spin box enough decimals
        # (a learning rate of 2e-4 shows as 0.00020, not 0.00).
        step = 10 ** (math.floor(math.log10(abs(default))) - 1) if default else 0.01
        opts.setdefault("step", min(step, 0.1))
        if spec.min_exclusive:
            opts["min"] = opts["step"]
    if isinstance(default, int | float):
        opts.setdefault("max", BIG)
        opts.setdefault("min", -BIG)
    return opts


class ConfigForm:
    """magicgui widgets for some fields of a configuration dataclass.

    ``fields`` are shown in :attr:`essential`, the rest of the fields marked ``advanced`` (or
    listed in ``advanced``) in :attr:`advanced`; ``overrides`` change a field's widget
    options (e.g. a combo box of devices for the free-text ``device``).
    """

    def __init__(self, cls: type, fields: list[str], advanced: list[str] | None = None, *,
                 exclude: tuple[str, ...] = (), overrides: dict[str, dict] | None = None,
                 defaults: Any = None) -> None:
        self.cls = cls
        base = defaults if defaults is not None else cls()
        specs = params.specs(cls)
        if advanced is None:  # every other setting: new ones appear without a code change
            advanced = [n for n in specs if n not in fields and n not in exclude]
        self.widgets: dict[str, Any] = {}
        for name in [*fields, *advanced]:
            default = getattr(base, name)
            opts = _options(cls, name, default) | (overrides or {}).get(name, {})
            label = opts.pop("label")
            widget_type = opts.pop("widget_type", None)
            spec = params.specs(cls)[name]
            annotation = type(default) if default is not None else str
            kwargs = {"widget_type": widget_type} if widget_type else {}
            auto = default is None and spec.kind in (int, float)
            if auto:
                # A number that may be left to the engine (None): 0 on the spin box, shown
                # as "auto".
                annotation, default, opts["min"] = spec.kind, 0, 0
            elif default is None:
                default = ""
            try:
                self.widgets[name] = create_widget(value=default, annotation=annotation,
                                                   label=label, name=name, options=opts,
                                                   **kwargs)
            except (TypeError, ValueError):  # a type magicgui has no widget for: default
                continue
            if auto and hasattr(self.widgets[name].native, "setSpecialValueText"):
                self.widgets[name].native.setSpecialValueText("auto")
        self.essential = Container(widgets=[self.widgets[n] for n in fields])
        self.advanced = Container(widgets=[self.widgets[n] for n in advanced
                                           if n in self.widgets])
        for box in (self.essential, self.advanced):
            box.margins = (0, 0, 0, 0)

    def __getitem__(self, name: str) -> Any:
        return self.widgets[name]

    def __contains__(self, name: str) -> bool:
        return name in self.widgets

    def native(self, advanced: bool = False) -> QWidget:
        return (self.advanced if advanced else self.essential).native

    def values(self) -> dict[str, Any]:
        out = {}
        for name, widget in self.widgets.items():
            value = widget.value
            spec = params.specs(self.cls)[name]
            if spec.optional and (value == "" or (spec.kind is not None and value == 0)):
                value = None
            out[name] = value
        return out

    def set(self, **values: Any) -> None:
        """Set controls by field name (unknown names are an error)."""
        for name, value in values.items():
            self.widgets[name].value = value

    def label(self, name: str) -> str:
        return self.widgets[name].label

    def build(self, **extra: Any) -> Any:
        """The dataclass from the form's values (+ ``extra``); a ConfigError names the
        control (its label) rather than the field."""
        try:
            return self.cls(**(self.values() | extra))
        except params.ConfigError as exc:
            raise params.ConfigError(self.explain(str(exc))) from exc

    def explain(self, message: str) -> str:
        """Replace ``Cls.field`` in an engine message by the control's label in quotes."""
        for name, widget in self.widgets.items():
            message = message.replace(f"{self.cls.__name__}.{name} ", f"'{widget.label}' ")
        return message


class Settings:
    """Several forms (one per dataclass) addressed by field name, for widgets and tests."""

    def __init__(self, *forms: ConfigForm) -> None:
        self.forms = forms

    def form_of(self, name: str) -> ConfigForm:
        for form in self.forms:
            if name in form:
                return form
        raise KeyError(f"no setting {name!r}")

    def __getitem__(self, name: str) -> Any:
        return self.form_of(name)[name]

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            self.form_of(name).set(**{name: value})

    def get(self, name: str) -> Any:
        return self[name].value


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
