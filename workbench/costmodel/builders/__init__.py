"""Analytic graph builders, one module per model family, registered by config class."""
from __future__ import annotations

from typing import Any, Callable

_BUILDERS: dict[type, Callable[..., Any]] = {}


def graph_builder(config_cls: type):
    """Register `fn(config, batch, dtype_bytes) -> LayerGraph` as the builder of `config_cls`."""

    def wrap(fn):
        if config_cls in _BUILDERS:
            raise ValueError(f"a graph builder for {config_cls.__name__} is registered twice")
        _BUILDERS[config_cls] = fn
        return fn

    return wrap


def builder_for(config: Any) -> Callable[..., Any]:
    """The registered builder for a config instance."""
    from . import _all  # noqa: F401  (imports every builder module once)

    try:
        return _BUILDERS[type(config)]
    except KeyError:
        raise ValueError(f"no analytic graph builder for {type(config).__name__}") from None
