"""Chips and clusters: what the cost model and the simulator know about the hardware.

A `Chip` holds dense peak FLOP/s per dtype, memory size and bandwidth; a `Cluster` is a chip
and an ordered hierarchy of `Level`s (node = NVLink domain -> rack -> cluster), each with a
size in chips, a per-chip bandwidth per direction, a latency per hop and an oversubscription.
Chip presets are data (`workbench/data/chips.toml`); the `cpu` chip and cluster come from a
calibration measured on the host (`workbench/data/cpu.json`). Users describe their own chips and
clusters in TOML or JSON files, read strictly (unknown or missing keys are errors).

Placement assumed by the group arithmetic: rank r sits on chip r, chips numbered node by node,
and a group of `n` ranks with stride `s` is laid out as in a device mesh, inside an aligned
block of n*s consecutive ranks ({b, b+s, ..., b+(n-1)s} for b in the block's first s ranks).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DTYPES", "Chip", "Level", "Cluster", "load_chip", "save_chip", "load_cluster",
           "save_cluster", "chip_from_dict", "chip_to_dict", "cluster_from_dict",
           "cluster_to_dict"]

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
"""Dtype keys of `Chip.dense_flops_per_s`."""

_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16", "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


def _num(value: Any, where: str, *, integer: bool = False) -> float | int:
    """`value` as a float (or int), or a ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return value if integer else float(value)


def _text(value: Any, where: str) -> str:
    """`value` as a non-empty string, or a ValueError naming `where`."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _keys(d: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Strict key check: every `required` key present, nothing outside required + optional."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a table/object, got {type(d).__name__}")
    unknown = [k for k in d if k not in required and k not in optional]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: "
                         f"{', '.join(required + optional)})")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")


def _nvml_key(name: str | bytes) -> str:
    """Normal form of an NVML device name: upper case, '-'/'_' as spaces, no vendor prefix."""
    if isinstance(name, bytes):  # old pynvml returns bytes
        name = name.decode()
    key = " ".join(re.sub(r"[-_]", " ", str(name)).upper().split())
    for prefix in ("NVIDIA ", "TESLA "):
        key = key.removeprefix(prefix)
    return key


@dataclass(frozen=True)
class Chip:
    """One accelerator (or one CPU rank): peak compute, memory size and memory bandwidth."""

    name: str
    """Preset name, e.g. `h100-sxm`."""
    dense_flops_per_s: Mapping[str, float]
    """Dense peak FLOP/s per dtype (keys from `DTYPES`; a multiply-add is 2 FLOPs); read-only."""
    memory_bytes: int
    """Device memory (HBM) in bytes; for the `cpu` chip, the host's RAM."""
    memory_bandwidth_Bps: float
    """Device memory bandwidth in bytes/s."""
    nvml_names: tuple[str, ...]
    """Device names NVML reports for this chip (empty for a CPU)."""
    power_w: float | None
    """Board power (TDP) in watts; None where no figure is known (the CPU calibration)."""
    source: str
    """Where the figures come from (datasheet, or how and when they were measured)."""
    efficiency: Mapping[str, Any] | None = None
    """Measured achieved fractions and framework costs of a calibrated chip (the `efficiency`
    table of a `workbench calibrate` profile, `costmodel.efficiency.efficiency_from_dict`);
    None for presets, whose figures live in `costmodel/efficiency.py`. Read-only."""

    def __post_init__(self) -> None:
        _text(self.name, "chip.name")
        if self.efficiency is not None:
            if not isinstance(self.efficiency, Mapping):
                raise ValueError(f"chip {self.name}: efficiency must be a table (or absent)")
            object.__setattr__(self, "efficiency",
                               MappingProxyType(json.loads(json.dumps(dict(self.efficiency)))))
        _text(self.source, f"chip {self.name}: source")
        if not isinstance(self.dense_flops_per_s, Mapping) or not self.dense_flops_per_s:
            raise ValueError(f"chip {self.name}: dense_flops_per_s must be a non-empty table "
                             f"of dtype -> FLOP/s")
        for dtype, value in self.dense_flops_per_s.items():
            if dtype not in DTYPES:
                raise ValueError(f"chip {self.name}: dense_flops_per_s key {dtype!r} must be one "
                                 f"of {', '.join(DTYPES)}")
            if _num(value, f"chip {self.name}: dense_flops_per_s.{dtype}") <= 0:
                raise ValueError(f"chip {self.name}: dense_flops_per_s.{dtype} must be > 0")
        # read-only, so that a shared preset cannot be changed by accident
        object.__setattr__(self, "dense_flops_per_s", MappingProxyType(dict(self.dense_flops_per_s)))
        if _num(self.memory_bytes, f"chip {self.name}: memory_bytes", integer=True) <= 0:
            raise ValueError(f"chip {self.name}: memory_bytes must be > 0")
        if _num(self.memory_bandwidth_Bps, f"chip {self.name}: memory_bandwidth_Bps") <= 0:
            raise ValueError(f"chip {self.name}: memory_bandwidth_Bps must be > 0")
        if self.power_w is not None and _num(self.power_w, f"chip {self.name}: power_w") <= 0:
            raise ValueError(f"chip {self.name}: power_w must be > 0 (or absent when unknown)")
        if not isinstance(self.nvml_names, tuple):
            raise ValueError(f"chip {self.name}: nvml_names must be a tuple of strings")
        for i, nvml in enumerate(self.nvml_names):
            _text(nvml, f"chip {self.name}: nvml_names[{i}]")

    def __hash__(self) -> int:  # the read-only mapping is not hashable by itself
        eff = None if self.efficiency is None else json.dumps(dict(self.efficiency),
                                                              sort_keys=True)
        return hash((self.name, frozenset(self.dense_flops_per_s.items()), self.memory_bytes,
                     self.memory_bandwidth_Bps, self.nvml_names, self.power_w, self.source, eff))

    def peak_flops_per_s(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype` (`bf16`, `bfloat16`, `torch.bfloat16`, ...)."""
        key = str(dtype).lower().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key not in self.dense_flops_per_s:
            raise ValueError(f"chip {self.name} has no peak FLOP/s figure for dtype {dtype!r} "
                             f"(it has: {', '.join(self.dense_flops_per_s)})")
        return self.dense_flops_per_s[key]

    def matches_nvml_name(self, name: str | bytes) -> bool:
        """True if NVML's device `name` is one of this chip's names (see `chip_for_nvml_name`)."""
        return _nvml_key(name) in {_nvml_key(n) for n in self.nvml_names}


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: a unit of `size` chips joined by one kind of link."""

    name: str
    """Level name, e.g. `node` (NVLink domain), `rack`, `cluster`."""
    size: int
    """Chips per unit of this level (a node of 8 GPUs has size 8)."""
    bandwidth_Bps: float
    """Per-chip bandwidth per direction in bytes/s for traffic that crosses this level."""
    latency_s: float
    """Latency of one hop across this level, in seconds."""
    oversubscription: float
    """Bandwidth taper >= 1 (1 = non-blocking); per-chip share is bandwidth_Bps / this."""
    source: str
    """Where the figures come from."""
    efficiency: float = 1.0
    """Achieved fraction of `bandwidth_Bps` for large collectives (nccl-tests bus bandwidth over
    the link figure); 1.0 where `bandwidth_Bps` is itself a measured bus bandwidth."""

    def __post_init__(self) -> None:
        _text(self.name, "level.name")
        where = f"level {self.name}"
        if _num(self.size, f"{where}: size", integer=True) < 1:
            raise ValueError(f"{where}: size must be >= 1, got {self.size}")
        if _num(self.bandwidth_Bps, f"{where}: bandwidth_Bps") <= 0:
            raise ValueError(f"{where}: bandwidth_Bps must be > 0, got {self.bandwidth_Bps}")
        if _num(self.latency_s, f"{where}: latency_s") < 0:
            raise ValueError(f"{where}: latency_s must be >= 0, got {self.latency_s}")
        if _num(self.oversubscription, f"{where}: oversubscription") < 1:
            raise ValueError(f"{where}: oversubscription must be >= 1, got {self.oversubscription}")
        _text(self.source, f"{where}: source")
        if not 0 < _num(self.efficiency, f"{where}: efficiency") <= 1:
            raise ValueError(f"{where}: efficiency must be in (0, 1], got {self.efficiency}")

    @property
    def effective_bandwidth_Bps(self) -> float:
        """Per-chip bandwidth per direction after oversubscription."""
        return self.bandwidth_Bps / self.oversubscription

    @property
    def achieved_bandwidth_Bps(self) -> float:
        """What a large collective achieves per chip: effective bandwidth x efficiency."""
        return self.effective_bandwidth_Bps * self.efficiency


@dataclass(frozen=True)
class Cluster:
    """`n_chips` chips in a hierarchy of levels, innermost (the node) first.

    Rules: level sizes nest (each divides the next); `n_chips` fits in one unit of the top
    level; a cluster larger than one node holds whole nodes (n_chips a multiple of the node
    size), a smaller one is a slice of a node. Racks may be partly filled.
    """

    name: str
    """Cluster name (the preset's, or the user's)."""
    chip: Chip
    """The (single kind of) chip."""
    levels: tuple[Level, ...]
    """Hierarchy from the node (NVLink / shared-memory domain) outwards to the whole cluster."""
    n_chips: int
    """Chips in the cluster."""
    source: str
    """Where the topology comes from."""

    def __post_init__(self) -> None:
        _text(self.name, "cluster.name")
        _text(self.source, "cluster.source")
        if not isinstance(self.chip, Chip):
            raise ValueError("cluster.chip must be a Chip")
        if not isinstance(self.levels, tuple) or not self.levels or not all(
                isinstance(lv, Level) for lv in self.levels):
            raise ValueError("cluster.levels must be a non-empty tuple of Level")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"cluster.levels: level names must be unique, got {names}")
        for i in range(1, len(self.levels)):
            inner, outer = self.levels[i - 1], self.levels[i]
            if outer.size % inner.size:
                raise ValueError(f"cluster.levels[{i}].size ({outer.size}, {outer.name}) must be a "
                                 f"multiple of levels[{i - 1}].size ({inner.size}, {inner.name}): "
                                 f"level sizes must nest")
        if _num(self.n_chips, "cluster.n_chips", integer=True) < 1:
            raise ValueError(f"cluster.n_chips must be >= 1, got {self.n_chips}")
        if self.n_chips > self.top.size:
            raise ValueError(f"cluster.n_chips ({self.n_chips}) must be <= the top level "
                             f"'{self.top.name}' size ({self.top.size})")
        if self.n_chips > self.node_size and self.n_chips % self.node_size:
            raise ValueError(f"cluster.n_chips ({self.n_chips}) must be a multiple of the node "
                             f"size ({self.node_size}) when larger than one node")

    @property
    def node_size(self) -> int:
        """Chips per node (the first level)."""
        return self.levels[0].size

    @property
    def n_nodes(self) -> int:
        """Nodes in the cluster (1 for a slice of a node)."""
        return math.ceil(self.n_chips / self.node_size)

    @property
    def top(self) -> Level:
        """The outermost level."""
        return self.levels[-1]

    def level_index(self, name: str) -> int:
        """Index of the level called `name`."""
        for i, lv in enumerate(self.levels):
            if lv.name == name:
                return i
        raise ValueError(f"cluster {self.name} has no level {name!r} "
                         f"(levels: {', '.join(lv.name for lv in self.levels)})")

    def level(self, name: str) -> Level:
        """The level called `name`."""
        return self.levels[self.level_index(name)]

    def peak_flops_per_s(self, dtype: str) -> float:
        """Dense peak FLOP/s of all chips together."""
        return self.n_chips * self.chip.peak_flops_per_s(dtype)

    def with_n_chips(self, n_chips: int) -> Cluster:
        """This cluster with `n_chips` chips; the top level grows, in whole units of the level
        below it, to the smallest size that holds them (a one-level cluster cannot grow)."""
        _num(n_chips, "n_chips", integer=True)
        levels = self.levels
        if len(levels) > 1 and n_chips > self.top.size:
            unit = levels[-2].size
            levels = (*levels[:-1], dataclasses.replace(self.top, size=math.ceil(n_chips / unit) * unit))
        return dataclasses.replace(self, levels=levels, n_chips=n_chips)

    def _check_group(self, n: int, stride: int) -> None:
        _num(n, "group size n", integer=True)
        _num(stride, "group stride", integer=True)
        if n < 1 or stride < 1:
            raise ValueError(f"group size n ({n}) and stride ({stride}) must be >= 1")
        if n * stride > self.n_chips:
            raise ValueError(f"group of n={n} ranks at stride {stride} needs n*stride = "
                             f"{n * stride} chips, more than cluster.n_chips ({self.n_chips})")

    def span_level_index(self, n: int, stride: int = 1) -> int | None:
        """Index of the innermost level whose units hold every group of `n` ranks at `stride`.

        A group lives in an aligned block of n*stride ranks, so it stays inside one unit of a
        level exactly when n*stride divides the level's size; the top level holds the whole
        cluster. None for n == 1 (a single rank does not communicate).
        """
        self._check_group(n, stride)
        if n == 1:
            return None
        return int(self.span_level_indices(np.asarray(n), np.asarray(stride)))

    def span_level_indices(self, n: np.ndarray, stride: np.ndarray) -> np.ndarray:
        """`span_level_index` over arrays of group sizes and strides (n >= 2), vectorised:
        the first level whose size n*stride divides, else the top level."""
        sizes = np.array([lv.size for lv in self.levels])
        block = np.asarray(n * stride)[..., None]
        inside = (sizes % block) == 0
        return np.where(inside.any(-1), inside.argmax(-1), len(sizes) - 1)

    def span_level(self, n: int, stride: int = 1) -> Level | None:
        """The level whose links a group of `n` ranks at `stride` must cross (None for n == 1)."""
        i = self.span_level_index(n, stride)
        return None if i is None else self.levels[i]

    def group_units(self, n: int, stride: int = 1) -> tuple[int, ...]:
        """Per level, how many units of it the group {0, s, ..., (n-1)s} touches.

        E.g. 64 ranks at stride 8 on 1,024 H100s: (64 nodes, 2 racks, 1 cluster). Members
        consecutive in the group are `stride` ranks apart, so for stride >= size every member
        is in its own unit, otherwise the units are 0 .. floor((n-1)*stride / size).
        """
        self._check_group(n, stride)
        return tuple(n if stride >= lv.size else (n - 1) * stride // lv.size + 1
                     for lv in self.levels)

    def _spanned(self, n: int, stride: int) -> Level:
        lv = self.span_level(n, stride)
        if lv is None:
            raise ValueError("group size n must be >= 2: a single rank crosses no link")
        return lv

    def group_bandwidth_Bps(self, n: int, stride: int = 1) -> float:
        """Per-chip bandwidth per direction (after oversubscription) of the level a group spans."""
        return self._spanned(n, stride).effective_bandwidth_Bps

    def group_latency_s(self, n: int, stride: int = 1) -> float:
        """Per-hop latency of the level a group spans."""
        return self._spanned(n, stride).latency_s


# ----------------------------------------------------------------------------- dict / file I/O

_CHIP_REQUIRED = ("name", "dense_flops_per_s", "memory_bytes", "memory_bandwidth_Bps",
                  "nvml_names", "source")
_LEVEL_KEYS = ("name", "size", "bandwidth_Bps", "latency_s", "oversubscription", "source")
_CLUSTER_KEYS = ("name", "chip", "levels", "n_chips", "source")


def chip_from_dict(d: dict, where: str = "chip") -> Chip:
    """A Chip from a parsed table; unknown or missing keys raise ValueError naming the key.

    `power_w` (absent = unknown) and `efficiency` (a calibrated chip's measured figures,
    checked by `costmodel.efficiency.efficiency_from_dict`) are the optional keys."""
    _keys(d, where, _CHIP_REQUIRED, ("power_w", "efficiency"))
    if "efficiency" in d:
        from .costmodel.efficiency import efficiency_from_dict
        efficiency_from_dict(d["efficiency"], f"{where}.efficiency")
    flops = d["dense_flops_per_s"]
    _keys(flops, f"{where}.dense_flops_per_s", (), DTYPES)
    names = d["nvml_names"]
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{where}.nvml_names must be a list of strings, got {names!r}")
    power = d.get("power_w")
    return Chip(name=_text(d["name"], f"{where}.name"),
                dense_flops_per_s={k: _num(v, f"{where}.dense_flops_per_s.{k}")
                                   for k, v in flops.items()},
                memory_bytes=_num(d["memory_bytes"], f"{where}.memory_bytes", integer=True),
                memory_bandwidth_Bps=_num(d["memory_bandwidth_Bps"], f"{where}.memory_bandwidth_Bps"),
                nvml_names=tuple(names),
                power_w=None if power is None else _num(power, f"{where}.power_w"),
                source=_text(d["source"], f"{where}.source"), efficiency=d.get("efficiency"))


def chip_to_dict(c: Chip) -> dict:
    """The table `chip_from_dict` reads (power_w and efficiency left out when absent)."""
    d = {"name": c.name, "dense_flops_per_s": dict(c.dense_flops_per_s),
         "memory_bytes": c.memory_bytes, "memory_bandwidth_Bps": c.memory_bandwidth_Bps,
         "nvml_names": list(c.nvml_names), "power_w": c.power_w, "source": c.source}
    if c.power_w is None:
        del d["power_w"]
    if c.efficiency is not None:
        d["efficiency"] = json.loads(json.dumps(dict(c.efficiency)))
    return d


def _level_from_dict(d: dict, where: str) -> Level:
    _keys(d, where, _LEVEL_KEYS, ("efficiency",))
    return Level(efficiency=_num(d.get("efficiency", 1.0), f"{where}.efficiency"),
                 name=_text(d["name"], f"{where}.name"),
                 size=_num(d["size"], f"{where}.size", integer=True),
                 bandwidth_Bps=_num(d["bandwidth_Bps"], f"{where}.bandwidth_Bps"),
                 latency_s=_num(d["latency_s"], f"{where}.latency_s"),
                 oversubscription=_num(d["oversubscription"], f"{where}.oversubscription"),
                 source=_text(d["source"], f"{where}.source"))


def cluster_from_dict(d: dict, where: str = "cluster") -> Cluster:
    """A Cluster from a parsed table; `chip` is a chip table or the name of a chip preset."""
    _keys(d, where, _CLUSTER_KEYS)
    from .hardware import chip  # a preset name (the presets live there)
    c = chip(d["chip"]) if isinstance(d["chip"], str) else chip_from_dict(d["chip"], f"{where}.chip")
    levels = d["levels"]
    if not isinstance(levels, list) or not levels:
        raise ValueError(f"{where}.levels must be a non-empty list of level tables")
    return Cluster(name=_text(d["name"], f"{where}.name"), chip=c,
                   levels=tuple(_level_from_dict(lv, f"{where}.levels[{i}]")
                                for i, lv in enumerate(levels)),
                   n_chips=_num(d["n_chips"], f"{where}.n_chips", integer=True),
                   source=_text(d["source"], f"{where}.source"))


def cluster_to_dict(cl: Cluster) -> dict:
    """The table `cluster_from_dict` reads (the chip written out in full)."""
    return {"name": cl.name, "n_chips": cl.n_chips, "source": cl.source,
            "chip": chip_to_dict(cl.chip), "levels": [dataclasses.asdict(lv) for lv in cl.levels]}


def _load(path: str | Path, parse, what: str):
    """Parse a .toml/.json file with `parse`; every error names the file."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"{path}: file name must end in .toml or .json")
    try:  # TOMLDecodeError and JSONDecodeError are ValueErrors too
        if path.suffix == ".toml":
            with path.open("rb") as f:
                return parse(tomllib.load(f), what)
        return parse(json.loads(path.read_text()), what)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _write(d: dict, path: str | Path) -> None:
    path = Path(path)
    if path.suffix == ".toml":
        import tomli_w  # only needed for writing TOML
        path.write_text(tomli_w.dumps(d))
    elif path.suffix == ".json":
        path.write_text(json.dumps(d, indent=2) + "\n")
    else:
        raise ValueError(f"{path}: file name must end in .toml or .json")


def load_chip(path: str | Path) -> Chip:
    """Read a chip from a .toml or .json file (the table `chip_to_dict` writes)."""
    return _load(path, chip_from_dict, "chip")


def save_chip(c: Chip, path: str | Path) -> None:
    """Write a chip to a .toml or .json file."""
    _write(chip_to_dict(c), path)


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster from a .toml or .json file (the table `cluster_to_dict` writes)."""
    return _load(path, cluster_from_dict, "cluster")


def save_cluster(cl: Cluster, path: str | Path) -> None:
    """Write a cluster (chip included) to a .toml or .json file."""
    _write(cluster_to_dict(cl), path)
