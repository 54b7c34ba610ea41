"""Model registry: families (config class, module builder, example inputs) and named flavours.

Each family module calls `register_family` once and `register_flavour` per preset. Names are
lower-case with dashes (`resnet50`, `vit-b16`, `llama3-405b`); every family has a
`<family>-tiny` flavour that trains a step on a CPU in well under a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Family", "Flavour", "register_family", "register_flavour", "get", "build",
           "family_of", "flavours", "families", "example_inputs", "apply_overrides"]


@dataclass(frozen=True)
class Family:
    """A model family: how to build its module and feed it synthetic data."""

    name: str
    """Family name, e.g. `resnet`, `llama`."""
    config_cls: type
    """The config dataclass."""
    build: Callable[[Any], nn.Module]
    """config -> nn.Module (built on the current default device)."""
    example_inputs: Callable[[Any, int, torch.device | str], tuple]
    """(config, batch, device) -> positional inputs of the right shapes, seeded."""
    description: str
    """One line for listings."""


@dataclass(frozen=True)
class Flavour:
    """A named preset of a family's config."""

    name: str
    """Registry name, lower-case with dashes."""
    family: str
    """Family it belongs to."""
    config: Any
    """The config dataclass instance."""
    source: str
    """Where the architecture comes from (paper, reference implementation)."""


_FAMILIES: dict[str, Family] = {}
_FLAVOURS: dict[str, Flavour] = {}
_BY_CONFIG: dict[type, Family] = {}


def register_family(name: str, config_cls: type, build: Callable, example_inputs: Callable,
                    description: str) -> Family:
    """Register a family once."""
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    fam = Family(name, config_cls, build, example_inputs, description)
    _FAMILIES[name] = fam
    _BY_CONFIG[config_cls] = fam
    return fam


def register_flavour(name: str, family: str, config: Any, source: str) -> None:
    """Register a named preset; names are unique and lower-case with dashes."""
    if name in _FLAVOURS:
        raise ValueError(f"model flavour {name!r} is registered twice")
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"model flavour {name!r}: names are lower-case with dashes")
    _FLAVOURS[name] = Flavour(name, family, config, source)


def _load() -> None:
    from . import _families  # noqa: F401  (imports every family module once)


def flavours() -> dict[str, Flavour]:
    """Every registered flavour by name."""
    _load()
    return dict(_FLAVOURS)


def families() -> dict[str, Family]:
    """Every registered family by name."""
    _load()
    return dict(_FAMILIES)


def family_of(config: Any) -> Family:
    """The family a config instance belongs to."""
    _load()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ValueError(f"{type(config).__name__} is not a registered model config") from None


def _coerce(field: dataclasses.Field, value: Any, hints: dict[str, Any]) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, tuples of ints)."""
    if not isinstance(value, str):
        return value
    hint = hints.get(field.name, field.type)
    text = str(hint)
    if hint is bool or text == "bool":
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{field.name}={value!r}: expected true or false")
    for typ in (int, float):
        if hint is typ or text in (typ.__name__, f"{typ.__name__} | None", f"Optional[{typ.__name__}]"):
            if value.lower() == "none":
                return None
            try:
                return typ(value)
            except ValueError:
                raise ValueError(f"{field.name}={value!r}: expected {typ.__name__}") from None
    if "tuple" in text:
        try:
            return tuple(int(v) for v in value.replace("x", ":").split(":"))
        except ValueError:
            raise ValueError(f"{field.name}={value!r}: expected integers joined by ':'") from None
    return value


def apply_overrides(config: Any, **overrides: Any) -> Any:
    """A copy of `config` with `overrides` (values may be CLI strings), validated."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"{type(config).__name__} has no field {key!r}; "
                             f"fields: {', '.join(fields)}")
        changes[key] = _coerce(fields[key], value, hints)
    new = dataclasses.replace(config, **changes)
    validate = getattr(new, "validate", None)
    if validate:
        validate()
    return new


def get(name: str, **overrides: Any) -> Any:
    """The config of flavour `name`, with `overrides` applied (e.g. `layers=4`)."""
    table = flavours()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}. `workbench models` lists them all")
    return apply_overrides(table[name].config, **overrides)


def build(config: Any, device: torch.device | str | None = None) -> nn.Module:
    """Build the nn.Module for a config (on `device`; `meta` allocates no weights)."""
    fam = family_of(config)
    if device is None:
        return fam.build(config)
    with torch.device(device):
        return fam.build(config)


def example_inputs(config: Any, batch: int, device: torch.device | str = "cpu") -> tuple:
    """Seeded synthetic inputs of the right shapes for `batch` samples."""
    return family_of(config).example_inputs(config, batch, device)
