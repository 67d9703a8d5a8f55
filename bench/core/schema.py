"""Typed options: every configurable part declares its keys once, beside its code, and they are checked up front.

A component class lists `OPTIONS = {"key": Option(default, type, ...)}`; subclasses extend their parents' lists
(`options()` merges them along the MRO). `resolve()` fills defaults, coerces types and checks ranges and choices,
raising a one-line `UserError`: `<group>.<key>=<value>: <why>; valid: <choices or range>`. An unknown key names
the nearest valid one. Defaults live here, in code: the YAML files under experiments/ only override them.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from bench.core.errors import UserError

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a mapping"}


def fmt(value: Any) -> str:
    """A value as the user would write it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


@dataclass(frozen=True)
class Option:
    """One typed key: its default, type, and the values it admits (a closed set or a numeric range)."""

    default: Any
    type: type = str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False           # True: value > low (else >=)
    high_open: bool = False          # True: value < high (else <=)
    nullable: bool = False           # null is a valid value
    item: "Option | None" = None     # lists: the type of each element
    length: int | None = None        # lists: exact length
    fields: "Mapping[str, Option] | None" = None  # mappings: the schema of the nested keys
    valid: str | None = None         # the admissible values in words, where the type alone does not say
    help: str = ""

    def valid_text(self) -> str:
        """The admissible values in words, for the error line."""
        if self.valid is not None:
            text = self.valid
        elif self.choices is not None:
            text = ", ".join(fmt(c) for c in self.choices)
        elif self.type in (int, float) and (self.low is not None or self.high is not None):
            lo = "" if self.low is None else f"{fmt(self.low)} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {fmt(self.high)}"
            text = f"{lo}{'integer' if self.type is int else 'number'}{hi}"
        elif self.type is list and self.item is not None:
            n = f"{self.length} " if self.length else ""
            text = f"a list of {n}{self.item.valid_text()}"
        else:
            text = _TYPE_NAMES.get(self.type, self.type.__name__)
        return f"{text} or null" if self.nullable else text

    def _coerce(self, value: Any) -> Any:
        t = self.type
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError("not true or false")
        if t is int:
            if isinstance(value, bool):
                raise ValueError("not an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
            raise ValueError("not an integer")
        if t is float:
            if isinstance(value, bool):
                raise ValueError("not a number")
            out = float(value)
            if not math.isfinite(out):
                raise ValueError("not a finite number")
            return out
        if t is str:
            if isinstance(value, (dict, list)):
                raise ValueError("not a string")
            return str(value)
        if t is list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                raise ValueError("not a list")
            return value
        if t is dict:
            if not isinstance(value, Mapping):
                raise ValueError("not a mapping")
            return dict(value)
        return value  # type=object: any value; the component checks it

    def check(self, key: str, value: Any) -> Any:
        """The value coerced to this option's type, or a UserError naming key, value and the valid values."""
        if value is None or (isinstance(value, str) and value == "null" and self.type is not str):
            if self.nullable:
                return None
            raise UserError(f"{key}={fmt(value)}: a value is required; valid: {self.valid_text()}")
        try:
            out = self._coerce(value)
        except (TypeError, ValueError) as e:
            why = str(e) if str(e).startswith("not ") else f"not {_TYPE_NAMES.get(self.type, self.type.__name__)}"
            raise UserError(f"{key}={fmt(value)}: {why}; valid: {self.valid_text()}") from None
        if self.choices is not None and out not in self.choices:
            raise UserError(f"{key}={fmt(value)}: unknown value; valid: {self.valid_text()}")
        if self.type in (int, float):
            bad = ((self.low is not None and (out <= self.low if self.low_open else out < self.low))
                   or (self.high is not None and (out >= self.high if self.high_open else out > self.high)))
            if bad:
                raise UserError(f"{key}={fmt(value)}: out of range; valid: {self.valid_text()}")
        if self.type is dict and self.fields is not None:
            out = resolve(self.fields, out, key, extra=())
        if self.type is list:
            if self.length is not None and len(out) != self.length:
                raise UserError(f"{key}={fmt(value)}: needs {self.length} elements; valid: {self.valid_text()}")
            if self.item is not None:
                out = [self.item.check(f"{key}[{i}]", v) for i, v in enumerate(out)]
        return out


def nearest(name: str, valid: list[str]) -> str | None:
    """The closest valid name to a misspelt one, if any is close."""
    initials = "".join(part[:1] for part in name.split("_") if part)  # learning_rate -> lr
    if len(initials) > 1 and initials in valid:
        return initials
    hits = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return hits[0] if hits else None


def unknown_key_error(prefix: str, key: str, valid: list[str]) -> UserError:
    full = f"{prefix}.{key}" if prefix else key
    near = nearest(key, valid)
    hint = f"did you mean {prefix + '.' if prefix else ''}{near}? " if near else ""
    return UserError(f"{full}: unknown key; {hint}valid: {', '.join(sorted(valid)) or '(none)'}")


def resolve(options: Mapping[str, Option], cfg: Mapping[str, Any] | None, prefix: str,
            extra: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """cfg checked against `options`: defaults filled, types coerced; unknown keys (other than `extra`) refused."""
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in options and key not in extra:
            raise unknown_key_error(prefix, str(key), [*options, *extra])
    out = {k: cfg[k] for k in extra if k in cfg}
    for key, opt in options.items():
        value = cfg.get(key, opt.default)
        out[key] = opt.check(f"{prefix}.{key}" if prefix else key, value)
    return out


class Configurable:
    """A registry entry with declared options; `GROUP` is its config group (sampler, estimator, ...)."""

    GROUP: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}

    @classmethod
    def options(cls) -> dict[str, Option]:
        """This class's options with those of its bases (a subclass may redeclare a key to change its default)."""
        merged: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("OPTIONS", {}))
        return merged

    @classmethod
    def resolve_options(cls, cfg: Mapping[str, Any] | None, prefix: str | None = None) -> dict[str, Any]:
        return resolve(cls.options(), cfg, cls.GROUP if prefix is None else prefix)
