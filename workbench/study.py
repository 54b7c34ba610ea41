"""Scaling studies: a TOML file -> a grid of points, each predicted, simulated and/or run.

A study file (see `studies/` and the README's "Studies" section):

    [study]   name, question, do = ["predict", "simulate", "run"]
    [[models]] name, set = {field = value}      (model flavours with fixed overrides)
    [cluster] preset = "dgx-h100" | "cpu", or file = "my-cluster.toml"
    [sweep]   chips = [...] and any of: global_batch = [...] or global_batch_per_chip = x,
              model fields (seq, experts, frames, image_size, ...), cost options (overlap_dp,
              attention, ...): every list is an axis of the grid
    [plan]    search = true (the best plan at each point; fix = "tp=8", dtype, recompute,
              max_tp), or plans = ["fsdp=*,tp=2,dtype=fp32", ...]  ('*' takes the chips left)
    [options] cost options fixed for the whole study
    [run]     steps, min_timed_s, warmup, device, timeout_s   (for do = "run")
    [report]  x, series, timelines                      (read by `workbench report`)
    [[grids]] optional extra grids: each may set models, cluster, sweep, plan, and inherits the
              top-level tables it does not set (one study, several families or plan sets)

Everything is checked before anything runs: unknown keys, unknown models, model fields and
cost options, plans that do not fit the chips or the model (`PlanError`), run points on a
cluster that is not this host.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .plan import Plan

STAGES = ("predict", "simulate", "run")
"""What a study can do at each point, in order."""
KIND_OF_STAGE = {"predict": "prediction", "simulate": "simulation", "run": "measurement"}
"""The store kind each stage writes."""

_TABLES = {
    "study": {"name", "question", "do"},
    "cluster": {"preset", "file"},
    "plan": {"search", "plans", "fix", "dtype", "recompute", "max_tp", "top"},
    "run": {"steps", "min_timed_s", "warmup", "device", "timeout_s"},
    "report": {"x", "series", "timelines"},
}
_GRID_KEYS = {"models", "cluster", "sweep", "plan"}


@dataclass(frozen=True)
class Point:
    """One point of a study: everything needed to predict, simulate or run it."""

    model: str
    """Flavour name."""
    overrides: dict
    """Model config overrides (the model entry's plus the swept model fields)."""
    cluster: str
    """Cluster preset name, `cpu` (this host) or a cluster file path."""
    chips: int
    """Chips (ranks) of the point."""
    global_batch: int
    """Samples per optimizer step."""
    plan_request: str
    """`search` or the plan template written in the study."""
    plan: str | None
    """The compact plan (None for `search` until the search picks one)."""
    options: dict
    """Cost-model options (fixed plus swept)."""
    variant: dict
    """The swept values other than chips and global batch (labels the point)."""
    key: str
    """Stable text key of the point in the store (resume finds it by this)."""

    def to_json(self) -> dict[str, Any]:
        """The `study_point` stored in every result payload of this point."""
        return {"model": self.model, "overrides": self.overrides, "cluster": self.cluster,
                "chips": self.chips, "global_batch": self.global_batch,
                "seq": self.overrides.get("seq"), "plan": self.plan,
                "plan_request": self.plan_request, "variant": self.variant,
                "options": self.options, "label": self.label}

    @property
    def label(self) -> str:
        """Short text for legends and progress lines."""
        extra = "".join(f" {k}={v}" for k, v in self.variant.items())
        return f"{self.model} x{self.chips} gbs={self.global_batch}{extra} {self.plan_request}"


@dataclass(frozen=True)
class RunSettings:
    """How `run` points are executed (`[run]`)."""

    steps: int = 5
    """Timed steps per point (at least)."""
    min_timed_s: float = 0.0
    """Time each point for at least this many seconds (more steps when needed)."""
    warmup: int = 2
    """Untimed steps first."""
    device: str = "cpu"
    """`cpu` (gloo ranks on this host) or `cuda` (one rank per local GPU)."""
    timeout_s: float = 300.0
    """Collective timeout of a run."""


@dataclass(frozen=True)
class SearchSettings:
    """The `[plan]` search settings (`search = true`)."""

    dtype: str = "bf16"
    """Training dtype of the searched plans."""
    fix: dict = field(default_factory=dict)
    """Plan keys pinned in the search (e.g. {"tp": 8})."""
    recompute: tuple = ("none", "selective", "full")
    """Recomputation modes the search may pick."""
    max_tp: int | None = None
    """Largest tensor-parallel degree the search may pick."""
    top: int = 5
    """How many of the best plans the prediction payload keeps."""


@dataclass(frozen=True)
class Study:
    """A parsed, validated study."""

    name: str
    """Store name of the study (letters, digits, '-', '_', '.')."""
    question: str
    """The question the study answers (the report's heading)."""
    stages: tuple
    """Which of predict / simulate / run each point does."""
    points: tuple
    """Every point of the grid(s), in file order."""
    search: SearchSettings
    """Search settings for `search` points."""
    run: RunSettings
    """Run settings for `run` points."""
    report: dict
    """The `[report]` table (x, series, timelines)."""
    text: str
    """The TOML definition (stored with the study; a resumed study must keep it)."""

    @property
    def kinds(self) -> set[str]:
        """The store kinds each finished point has."""
        return {KIND_OF_STAGE[s] for s in self.stages}


def load(path: str | Path) -> Study:
    """Read and validate a study file (ValueError naming the file, key and rule)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file {str(path)!r} does not exist")
    return parse(path.read_text(), where=str(path), base_dir=path.parent)


def parse(text: str, where: str = "study", base_dir: Path | None = None) -> Study:
    """Parse a study's TOML text into a `Study` with every point expanded and checked."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not valid TOML ({err})") from None
    allowed = set(_TABLES) | _GRID_KEYS | {"options", "grids"}
    _no_unknown(data, allowed, where)
    for table, keys in _TABLES.items():
        if table in data:
            _no_unknown(_table(data, table, where), keys, f"{where}: [{table}]")
    head = _table(data, "study", where, required=True)
    name = _str(head, "name", f"{where}: [study]")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"{where}: [study] name {name!r} may only use letters, digits, "
                         "'-', '_' and '.'")
    stages = head.get("do", ["predict"])
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"{where}: [study] do must be a non-empty list of "
                         f"{', '.join(STAGES)}; got {stages!r}")
    run = _run_settings(data.get("run", {}), where)
    report = _table(data, "report", where)
    extra = _grids(data, where)  # with [[grids]], the top-level tables are their defaults
    defaults = {k: data[k] for k in _GRID_KEYS if k in data}
    grids = [{**defaults, **g} for g in extra] if extra else [data]
    points, seen, search = [], set(), None
    for i, grid in enumerate(grids):
        gwhere = where if grid is data else f"{where}: [[grids]] #{i + 1}"
        grid_points, grid_search = _expand(grid, data.get("options", {}), gwhere, base_dir,
                                           "run" in stages, run)
        search = search or grid_search
        for p in grid_points:
            if p.key in seen:
                raise ValueError(f"{gwhere}: point {p.key!r} appears twice in the study")
            seen.add(p.key)
            points.append(p)
    if not points:
        raise ValueError(f"{where}: the study has no points")
    return Study(name=name, question=str(head.get("question", "")),
                 stages=tuple(s for s in STAGES if s in stages), points=tuple(points),
                 search=search or SearchSettings(), run=run, report=report, text=text)


# -- grid expansion ----------------------------------------------------------------------

def _expand(grid: dict, fixed_options: dict, where: str, base_dir, runs: bool,
            run: RunSettings) -> tuple[list[Point], SearchSettings | None]:
    """The points of one grid (models x sweep x plans), each checked."""
    from . import costmodel, models
    from .costmodel import CostOptions

    entries = _models(grid, where)
    cluster = _cluster_name(grid, where, base_dir)
    if runs and cluster != "cpu" and run.device == "cpu":
        raise ValueError(f"{where}: do = 'run' with device 'cpu' needs [cluster] preset = "
                         f"'cpu' (the runs happen on this host), not {cluster!r}")
    sweep = dict(_table(grid, "sweep", where, required=True))
    if "chips" not in sweep:
        raise ValueError(f"{where}: [sweep] needs chips (a list of chip counts)")
    chips = _int_list(sweep.pop("chips"), f"{where}: [sweep] chips")
    per_chip = sweep.pop("global_batch_per_chip", None)
    batches = sweep.pop("global_batch", None)
    if per_chip is not None and batches is not None:
        raise ValueError(f"{where}: [sweep] takes global_batch or global_batch_per_chip, "
                         "not both")
    if batches is not None:
        batches = _int_list(batches, f"{where}: [sweep] global_batch")
    option_names = {f.name for f in dataclasses.fields(CostOptions)}
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in sweep.items()}
    option_axes = {k: v for k, v in axes.items() if k in option_names}
    model_axes = {k: v for k, v in axes.items() if k not in option_names}
    plan_table = _table(grid, "plan", where, required=True)
    templates, search = _plans(plan_table, where)
    points = []
    graphs: dict[str, Any] = {}
    for entry, chip_count in itertools.product(entries, chips):
        for model_values in _product(model_axes):
            overrides = {**entry["set"], **{k: _field_value(v) for k, v in model_values.items()}}
            gkey = json.dumps([entry["name"], overrides], sort_keys=True, default=str)
            if gkey not in graphs:
                try:
                    graphs[gkey] = costmodel.graph(models.get(entry["name"], **overrides))
                except ValueError as err:
                    raise ValueError(f"{where}: model {entry['name']!r} with {overrides}: "
                                     f"{err}") from None
            graph = graphs[gkey]
            for option_values in _product(option_axes):
                options = {**fixed_options, **option_values}
                try:
                    _check_option_types(options)
                    CostOptions(**options)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{where}: cost options {options}: {err}") from None
                for template in templates:
                    gbs = _global_batch(batches, per_chip, chip_count, template, where)
                    for batch in gbs:
                        variant = {**model_values, **option_values}
                        plan = None if template == "search" else \
                            _resolve_plan(template, chip_count, batch, graph, where)
                        key = _point_key(entry, cluster, chip_count, batch, variant, template)
                        points.append(Point(entry["name"], overrides, cluster, chip_count,
                                            batch, template, plan, options, variant, key))
    return points, search


def _check_option_types(options: dict) -> None:
    """Each cost option has its default's type (a bool stays a bool; ints pass as floats)."""
    from .costmodel import CostOptions

    for f in dataclasses.fields(CostOptions):
        if f.name not in options:
            continue
        value, kind = options[f.name], type(f.default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float \
            else type(value) is kind
        if not ok:
            raise ValueError(f"{f.name}={value!r} must be a {kind.__name__}")


def _product(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values, as dicts (one empty dict for no axes)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _field_value(value):
    """TOML value -> override (lists become the ':'-joined tuples the configs take)."""
    return ":".join(str(v) for v in value) if isinstance(value, list) else value


def _global_batch(batches, per_chip, chips: int, template: str, where: str) -> list[int]:
    """The global batch sizes of a point: the sweep's, per chip x chips, or the plan's gbs."""
    in_plan = template != "search" and re.search(r"(^|,)\s*gbs\s*=", template)
    if in_plan and (batches is not None or per_chip is not None):
        raise ValueError(f"{where}: plan {template!r} sets gbs and [sweep] sets the global "
                         "batch too; set it in one place")
    if in_plan:
        return [Plan.parse(template.replace("*", "1")).global_batch_size]
    if batches is not None:
        return batches
    if per_chip is None:
        raise ValueError(f"{where}: no global batch: set [sweep] global_batch, "
                         "global_batch_per_chip, or gbs in every plan")
    value = float(per_chip) * chips
    if value < 1 or not math.isclose(value, round(value)):
        raise ValueError(f"{where}: global_batch_per_chip {per_chip} x {chips} chips = {value} "
                         "is not a whole number of samples")
    return [int(round(value))]


def _resolve_plan(template: str, chips: int, batch: int, graph, where: str) -> str:
    """A plan template at `chips`: '*' takes the chips the other degrees leave; gbs filled;
    then validated against the chips and the model (PlanError names every broken rule)."""
    from .plan import PlanError

    text = template
    if "*" in text:
        if text.count("*") != 1:
            raise ValueError(f"{where}: plan {template!r}: at most one degree may be '*'")
        used = 1  # the world-size degrees written out (ep borrows ranks; vpp is per stage)
        for key, value in re.findall(r"(\w+)\s*=\s*(\d+)", text):
            if key in ("dp", "fsdp", "tp", "pp", "cp"):
                used *= int(value)
        if chips % used:
            raise ValueError(f"{where}: plan {template!r} at {chips} chips: the other degrees "
                             f"use {used} chips, which does not divide {chips}")
        text = text.replace("*", str(chips // used))
    if not re.search(r"(^|,)\s*gbs\s*=", text):
        text += f",gbs={batch}"
    try:
        plan = Plan.parse(text)
        plan.validate(chips, graph)
    except PlanError as err:
        raise ValueError(f"{where}: plan {template!r} at {chips} chips for {graph.model}: "
                         f"{err}") from None
    return plan.compact()


def _point_key(entry: dict, cluster: str, chips: int, batch: int, variant: dict,
               template: str) -> str:
    """Stable text key: same inputs, same key (resume relies on it)."""
    parts = [f"model={entry['name']}"]
    if entry["set"]:
        parts.append("set=" + json.dumps(entry["set"], sort_keys=True, separators=(",", ":")))
    parts += [f"cluster={cluster}", f"chips={chips}", f"gbs={batch}"]
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
              for k, v in sorted(variant.items())]
    parts.append(f"plan={template}")
    return ";".join(parts)


# -- tables ------------------------------------------------------------------------------

def _models(grid: dict, where: str) -> list[dict]:
    entries = grid.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: [[models]] needs at least one entry with a name")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict):
            raise ValueError(f"{where}: models[{i}] must be a table or a flavour name")
        _no_unknown(e, {"name", "set"}, f"{where}: models[{i}]")
        overrides = e.get("set", {})
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}: models[{i}].set must be a table of config fields")
        out.append({"name": _str(e, "name", f"{where}: models[{i}]"),
                    "set": {k: _field_value(v) for k, v in overrides.items()}})
    return out


def _cluster_name(grid: dict, where: str, base_dir) -> str:
    from . import hardware

    table = _table(grid, "cluster", where, required=True)
    if ("preset" in table) == ("file" in table):
        raise ValueError(f"{where}: [cluster] needs exactly one of preset or file")
    if "preset" in table:
        name = _str(table, "preset", f"{where}: [cluster]")
        if name != "cpu" and name not in hardware.list_presets()["clusters"]:
            raise ValueError(f"{where}: [cluster] preset {name!r} is unknown (presets: "
                             f"{', '.join(hardware.list_presets()['clusters'])}, cpu)")
        return name
    path = Path(_str(table, "file", f"{where}: [cluster]"))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    hardware.load_cluster(path)  # fails early, naming the file's bad field
    return str(path)


def _plans(table: dict, where: str) -> tuple[list[str], SearchSettings | None]:
    w = f"{where}: [plan]"
    if bool(table.get("search")) == ("plans" in table):
        raise ValueError(f"{w} needs search = true or a list of plans (exactly one)")
    if "plans" in table:
        plans = table["plans"]
        if not isinstance(plans, list) or not plans or not all(isinstance(p, str) for p in plans):
            raise ValueError(f"{w} plans must be a non-empty list of plan strings")
        extra = set(table) - {"plans"}
        if extra:
            raise ValueError(f"{w} {', '.join(sorted(extra))} only apply with search = true")
        return plans, None
    fix = {}
    if table.get("fix"):
        for item in str(table["fix"]).split(","):
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"{w} fix: expected key=value items, got {item!r}")
            fix[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    recompute = tuple(table.get("recompute", SearchSettings.recompute))
    bad = [r for r in recompute if r not in SearchSettings.recompute]
    if bad:
        raise ValueError(f"{w} recompute {bad} must be among {SearchSettings.recompute}")
    return ["search"], SearchSettings(dtype=str(table.get("dtype", "bf16")), fix=fix,
                                      recompute=recompute, max_tp=table.get("max_tp"),
                                      top=int(table.get("top", 5)))


def _run_settings(table: dict, where: str) -> RunSettings:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [run] must be a table")
    s = RunSettings(**{k: table[k] for k in table if k in _TABLES["run"]})
    if s.device not in ("cpu", "cuda"):
        raise ValueError(f"{where}: [run] device must be cpu or cuda, not {s.device!r}")
    if not (isinstance(s.steps, int) and s.steps >= 1 and isinstance(s.warmup, int)
            and s.warmup >= 0):
        raise ValueError(f"{where}: [run] steps must be an integer >= 1 and warmup >= 0")
    if isinstance(s.min_timed_s, bool) or not isinstance(s.min_timed_s, (int, float)) \
            or not s.min_timed_s >= 0:
        raise ValueError(f"{where}: [run] min_timed_s must be a number of seconds >= 0, "
                         f"got {s.min_timed_s!r}")
    return s


def _grids(data: dict, where: str) -> list[dict]:
    grids = data.get("grids", [])
    if not isinstance(grids, list):
        raise ValueError(f"{where}: grids must be an array of tables ([[grids]])")
    for i, g in enumerate(grids):
        _no_unknown(g, _GRID_KEYS, f"{where}: [[grids]] #{i + 1}")
    return grids


def _table(data: dict, name: str, where: str, required: bool = False) -> dict:
    value = data.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing [{name}] table")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {name} must be a table ([{name}])")
    return value


def _no_unknown(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: "
                         f"{', '.join(sorted(allowed))})")


def _str(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key} must be a non-empty string")
    return value


def _int_list(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                             for v in values):
        raise ValueError(f"{where} must be a list of integers >= 1, got {value!r}")
    return values
