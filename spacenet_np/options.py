"""Declared options: a method's constructor options and the config's hyperparameters, each declared once.

An ``Option`` holds a name, a type, a default, a help text and the valid values. The train CLI's arguments, the
sweep's searchable names, the checks of a run spec, checkpoints and results.json all derive from these
declarations, so a new method (or a new config field) needs no edit anywhere else::

    class MyMethod(Learner):
        OPTIONS = (Option("temperature", float, 2.0, "softmax temperature", low=0.0, low_open=True),)

Config fields declare theirs in ``dataclasses.field(metadata=...)`` (see ``config_options``).
"""
import dataclasses
import math
from dataclasses import dataclass


class Count:
    """The type of a count (an int >= 1) or a fraction of a layer (a float in (0, 1))."""


TYPES = {"int": int, "float": float, "str": str, "bool": bool, "count": Count}
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class Option:
    """One declared option.

    ``type`` is int, float, str or bool. ``low``/``high`` bound numbers (inclusive unless ``low_open``/
    ``high_open``); ``choices`` lists the valid values. ``nullable`` allows None, written ``null_text`` on the
    command line (for example 'all'). ``per_layer`` options hold one value per layer (a tuple); a single value
    given for them applies to every layer. ``short`` is a shorter command-line name. ``from_stream`` names a
    stream property (``"n_tasks"``) that fills the
    option when it is None, for options a user does not set.
    """
    name: str
    type: type
    default: object
    help: str
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = None
    nullable: bool = False
    null_text: str = "none"
    per_layer: bool = False
    from_stream: str = None
    short: str = None

    @property
    def flag(self):
        """The command-line flag, ``--name-with-dashes``."""
        return "--" + (self.short or self.name).replace("_", "-")

    def parse(self, text):
        """One value from command-line ``text``; ValueError naming the option otherwise."""
        text = str(text).strip()
        if self.nullable and text.lower() == self.null_text:
            return None
        try:
            if self.type is bool:
                if text.lower() not in TRUE + FALSE:
                    raise ValueError
                value = text.lower() in TRUE
            elif self.type is int:
                value = int(text)
            elif self.type is Count:
                value = float(text)
                value = int(value) if value >= 1 and value.is_integer() else value
            else:
                value = self.type(text)
        except ValueError:
            raise ValueError(f"{self.name}: {text!r} is not {self.describe_type()}") from None
        return self.check_value(value)

    def check(self, value):
        """``value`` (a tuple for a per-layer option) checked and coerced; ValueError naming the option."""
        if self.per_layer:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{self.name} needs one value per layer (a list), got {value!r}")
            return tuple(self.check_value(v) for v in value)
        return self.check_value(value)

    def check_value(self, value):
        """One value of this option checked against its type and range. Returns the coerced value."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{self.name} must be {self.describe_type()}, got None")
        value = self._coerce(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name}={value!r} must be one of {', '.join(map(repr, self.choices))}")
        if self.type in (int, float):
            if not math.isfinite(value):
                raise ValueError(f"{self.name}={value!r} must be finite")
            if self.low is not None and (value < self.low or self.low_open and value == self.low):
                raise ValueError(f"{self.name}={value!r} must be {self.describe_range()}")
            if self.high is not None and (value > self.high or self.high_open and value == self.high):
                raise ValueError(f"{self.name}={value!r} must be {self.describe_range()}")
        return value

    def _coerce(self, value):
        kind = self.type
        if kind is Count:
            return self._count(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if kind is int:
            if isinstance(value, bool) or not (isinstance(value, int) or hasattr(value, "__index__")):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise ValueError(f"{self.name} must be a number, got {value!r}")
            return float(value)
        if not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string, got {value!r}")
        return value

    def _count(self, value):
        if isinstance(value, float) and 0.0 < value < 1.0:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.name}={value!r} must be {self.describe_type()}")
        return value

    def describe_type(self):
        text = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                Count: "a count >= 1 or a fraction in (0, 1)"}[self.type]
        return text + (f" or '{self.null_text}'" if self.nullable else "")

    def describe_range(self):
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "any value"

    def help_text(self, show_default=True):
        """The help line with the valid values and (unless ``show_default`` is False) the default."""
        valid = f"one of {format_value(self.choices, self)}" if self.choices else (
            self.describe_range() if self.type in (int, float) and (self.low, self.high) != (None, None) else "")
        default = f"default {format_value(self.default, self)}" if show_default else ""
        layers = "one value per layer, or one for every layer" if self.per_layer else ""
        extra = "; ".join(p for p in (valid, layers, default) if p)
        return f"{self.help} ({extra})"

    def to_dict(self):
        """The declaration as JSON (for results.json and the sweep's spec)."""
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "help": self.help,
                "low": self.low, "high": self.high, "choices": list(self.choices) if self.choices else None,
                "nullable": self.nullable, "per_layer": self.per_layer}


def format_value(value, option=None):
    """A value as written on the command line: per-layer tuples space-separated, None as the null text."""
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v, option) for v in value)
    if value is None:
        return option.null_text if option is not None and option.nullable else "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_options(config_class):
    """The options of a config dataclass, from its fields' metadata.

    Each field may carry ``metadata={"help": ..., "type": "int", "low": ..., "choices": ..., "nullable": ...,
    "per_layer": True, ...}`` (the ``Option`` fields); the type defaults to the default value's type.
    Returns a dict name -> Option, in field order.
    """
    options = {}
    for f in dataclasses.fields(config_class):
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = meta.pop("type", None)
        if kind is None:
            sample = default[0] if isinstance(default, (tuple, list)) and default else default
            kind = type(sample).__name__ if sample is not None else "float"
        meta.setdefault("help", f.name.replace("_", " "))
        meta.setdefault("per_layer", isinstance(default, (tuple, list)))
        options[f.name] = Option(name=f.name, type=TYPES[kind], default=default, **meta)
    return options


def method_options(method_class):
    """A method class's declared options, as a dict name -> Option."""
    return {option.name: option for option in getattr(method_class, "OPTIONS", ())}


def check_options(declared, values, owner):
    """``values`` (a dict) checked against ``declared`` (name -> Option): unknown names are refused, naming
    ``owner`` and the known names; missing names take their defaults. Returns a new dict in declaration order."""
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ValueError(f"{owner} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(declared) or 'none'}")
    return {name: option.check(values[name]) if name in values else option.default
            for name, option in declared.items()}
