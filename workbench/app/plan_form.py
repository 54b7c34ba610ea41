"""The explorer's plan controls and its plan text, kept in step.

`plan_fields(text)` gives each control's value for a plan text, `plan_text(fields)` the
compact plan text of the controls' values (keys without a control, e.g. `order`, kept).
"""
from __future__ import annotations

from ..plan import KEYS

NUMBER_KEYS = ("dp", "fsdp", "tp", "pp", "vpp", "cp", "ep", "mb", "gbs", "zero")
"""Plan keys edited with a number input (an empty one means the key's default)."""
FIELD_KEYS = NUMBER_KEYS + ("recompute", "schedule", "dtype", "sp")
"""Every plan key with its own control (dropdowns for the names, a checkbox for sp); the
text box keeps the others (e.g. `order`)."""
AUTO_SCHEDULE = "auto"
"""Schedule choice that leaves the key out: 1f1b, or interleaved-1f1b when vpp > 1."""
SP_ON = "on"
"""Value of the sequence-parallel checkbox when ticked."""
FIELD_DEFAULTS = {"dp": 1, "fsdp": 1, "tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "mb": 1,
                  "gbs": None, "zero": 0, "recompute": "none", "schedule": AUTO_SCHEDULE,
                  "dtype": "bf16", "sp": []}
"""What each control shows when the plan text leaves its key out (gbs None: the default
global batch, mb x dp x fsdp x pp)."""


def plan_items(text: str | None) -> dict[str, str]:
    """The key=value items of a plan text, leniently (malformed items are skipped: the strict
    `Plan.parse` reports them)."""
    out = {}
    for item in (text or "").split(","):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if eq and key:
            out[key] = raw
    return out


def plan_fields(text: str | None) -> dict:
    """Each plan control's value for a plan text: the text's value, or the default where it
    leaves the key out. A key whose value is malformed is left out (the page keeps the
    control as it is)."""
    items, out = plan_items(text), {}
    for key in FIELD_KEYS:
        raw = items.get(key)
        if raw is None:
            out[key] = FIELD_DEFAULTS[key]
        elif key in NUMBER_KEYS:
            if raw.isdigit():
                out[key] = int(raw)
        elif key == "sp":
            if raw in ("true", "false"):
                out[key] = [SP_ON] if raw == "true" else []
        else:
            out[key] = raw
    return out


def plan_text(fields: dict, previous: str | None = "") -> str:
    """The compact plan text of the controls' values, keeping the keys of `previous` that
    have no control (e.g. `order`). Defaults are left out; values are written as given, so
    that `Plan.parse` names a bad one (`tp=2.5`)."""
    items = {k: v for k, v in plan_items(previous).items() if k not in FIELD_KEYS}
    for key in FIELD_KEYS:
        value = fields.get(key)
        if key == "sp":
            if value and value != [""]:
                items[key] = "true"
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is None or value == "" or value == FIELD_DEFAULTS[key]:
            continue
        items[key] = str(value).strip()
    order = {k: i for i, k in enumerate(KEYS)}
    text = ",".join(f"{k}={items[k]}" for k in sorted(items, key=lambda k: order.get(k, 99)))
    return text or "dp=1"
