"""The explorer's shareable state: its inputs as URL query parameters, both ways.

`/?model=llama3-70b&set=seq%3D4096&cluster=dgx-h100&chips=1024&plan=tp%3D8%2Cpp%3D4%2Cdp%3D32`
opens the explorer on that model (with overrides), cluster, chip count and plan. Every page
that links a point to the explorer builds the link with `explorer_url`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from urllib.parse import parse_qs, urlencode


@dataclass(frozen=True)
class ExplorerState:
    """The explorer's inputs."""

    model: str = "llama3-70b"
    """Flavour name."""
    overrides: dict = field(default_factory=dict)
    """Model config overrides (`set=k=v,k=v` in the URL)."""
    cluster: str = "dgx-h100"
    """Cluster preset name (or `cpu`)."""
    chips: int = 1024
    """Chip count."""
    plan: str = "tp=8,pp=4,dp=32,mb=1,gbs=1024,sp=true,recompute=selective"
    """Compact plan (degrees, microbatch, global batch, recompute, schedule, ...)."""


def to_query(state: ExplorerState) -> str:
    """The URL query string (with the leading '?') of a state."""
    d = asdict(state)
    overrides = d.pop("overrides")
    if overrides:
        d["set"] = ",".join(f"{k}={v}" for k, v in overrides.items())
    return "?" + urlencode(d)


def from_query(search: str | None) -> tuple[ExplorerState, list[str]]:
    """The state a query string asks for (defaults for what it leaves out), and a message
    for each parameter that could not be read (the page shows them; it never crashes)."""
    q = {k: v[-1] for k, v in parse_qs((search or "").lstrip("?")).items()}
    base, problems, kwargs = ExplorerState(), [], {}
    for key in ("model", "cluster", "plan"):
        if q.get(key):
            kwargs[key] = q[key]
    if q.get("chips"):
        try:
            kwargs["chips"] = int(q["chips"])
            if kwargs["chips"] < 1:
                raise ValueError
        except ValueError:
            problems.append(f"chips={q['chips']!r} in the URL is not a positive integer; "
                            f"using {base.chips}")
            kwargs.pop("chips", None)
    if q.get("set"):
        overrides = {}
        for item in q["set"].split(","):
            k, sep, v = item.partition("=")
            if not sep or not k.strip():
                problems.append(f"set={q['set']!r} in the URL: expected key=value items")
                overrides = {}
                break
            overrides[k.strip()] = v.strip()
        kwargs["overrides"] = overrides
    unknown = sorted(set(q) - {"model", "cluster", "plan", "chips", "set"})
    if unknown:
        problems.append(f"unknown URL parameter(s) ignored: {', '.join(unknown)}")
    return ExplorerState(**kwargs), problems


def explorer_url(model: str, overrides: dict | None, cluster: str, chips: int,
                 plan: str) -> str:
    """The explorer's URL (path and query) for one point."""
    return "/" + to_query(ExplorerState(model, dict(overrides or {}), cluster, chips, plan))
