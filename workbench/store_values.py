"""Checking and encoding the values the results store writes (`store.py`).

Every check raises ValueError naming the field (`samples[2].value`, `payload['mfu']`) and the
rule, before anything is written.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from .plan import Plan


def _now() -> str:
    """UTC now, ISO 8601 with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _text(field: str, value: Any, optional: bool = False) -> str | None:
    """A non-empty str (or None when optional), else ValueError naming `field`."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"store: {field} must be a non-empty str, got {value!r}")
    return value


def _real(field: str, value: Any, low: float = 0.0, strict: bool = False) -> float:
    """A finite real >= `low` (> `low` when strict), else ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"store: {field} must be a finite number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"store: {field} must be a finite number, got {out}")
    if out < low or (strict and out == low):
        raise ValueError(f"store: {field} must be {'>' if strict else '>='} {low}, got {out}")
    return out


def _count(field: str, value: Any, low: int) -> int:
    """An int >= `low` (not a bool), else ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"store: {field} must be an int >= {low}, got {value!r}")
    return int(value)


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of `allowed`, else ValueError naming `field`."""
    if value not in allowed:
        raise ValueError(f"store: {field} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _nonfinite_path(obj: Any, path: str) -> str | None:
    """Where in `obj` the first NaN or infinity sits (None when there is none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    items = (obj.items() if isinstance(obj, dict) else
             enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for key, value in items:
        found = _nonfinite_path(value, f"{path}[{key!r}]")
        if found:
            return found
    return None


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars and arrays (`.item()` / `.tolist()`); anything else is refused."""
    for method in ("tolist", "item"):
        if callable(getattr(obj, method, None)):
            return getattr(obj, method)()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _payload_json(payload: Any) -> str:
    """`payload` as strict JSON text (no NaN/inf), else ValueError naming where it breaks."""
    if not isinstance(payload, dict):
        raise ValueError(f"store: payload must be a dict, got {type(payload).__name__}")
    try:
        text = json.dumps(payload, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        where = _nonfinite_path(payload, "payload")
        raise ValueError(f"store: {where or 'payload'} must be JSON-serialisable without NaN "
                         f"or infinity ({err})") from None
    return text


def _plan_text(plan: Any) -> str:
    """The compact form of a `Plan` or plan string, else ValueError naming `plan`."""
    if isinstance(plan, Plan):
        return plan.compact()
    _text("plan", plan)
    try:
        return Plan.parse(plan).compact()
    except ValueError as err:
        raise ValueError(f"store: plan {plan!r} is not a valid plan: {err}") from None


def _sample_rows(result_id: int, samples: Iterable) -> Iterator[tuple]:
    """Validated (result_id, t_s, step, metric, value) rows, checked one by one as written."""
    try:
        items = iter(samples)
    except TypeError:
        raise ValueError(f"store: samples must be an iterable of (t_s, step, metric, value), "
                         f"got {type(samples).__name__}") from None
    for i, sample in enumerate(items):
        if not isinstance(sample, (tuple, list)) or len(sample) != 4:
            raise ValueError(f"store: samples[{i}] must be (t_s, step, metric, value), "
                             f"got {sample!r}")
        t_s, step, metric, value = sample
        yield (result_id, _real(f"samples[{i}].t_s", t_s),
               None if step is None else _count(f"samples[{i}].step", step, 0),
               _text(f"samples[{i}].metric", metric),
               _real(f"samples[{i}].value", value, low=-math.inf))
