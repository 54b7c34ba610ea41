"""Cost model: the layer graph (IR) and, on top of it, memory, communication and time."""
from __future__ import annotations

from typing import Any

from .graph import Layer, LayerGraph, make_layer
from .ops import OpCost, cost

__all__ = ["CostOptions", "Estimate", "Layer", "LayerGraph", "OpCost", "cost", "estimate",
           "graph", "make_layer", "search"]


def graph(model: Any, batch: int = 1, dtype_bytes: int = 2, **overrides: Any) -> LayerGraph:
    """The analytic LayerGraph of `model` (a flavour name or a config) for `batch` samples.

    No weights are allocated: a 405B model is a few thousand small records.
    """
    from ..models import family_of, get
    from .builders import builder_for

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    name = model if isinstance(model, str) else None
    config = get(model, **overrides) if name else model
    if overrides and not name:
        from ..models import apply_overrides
        config = apply_overrides(config, **overrides)
    g = builder_for(config)(config, batch, dtype_bytes)
    g.model = name or family_of(config).name
    return g



from .estimator import Estimate, estimate  # noqa: E402  (after graph(): they import plan.py)
from .plans import CostOptions  # noqa: E402
from .search import search  # noqa: E402
